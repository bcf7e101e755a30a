//! Checks the arguments and the function's signature and builds the model.
//! Every error is spanned on the offending token and worded as the fix; all
//! errors found are reported together.
//!
//! `args.rs` checks the attribute's arguments, `signature.rs` the function's
//! form and signature against them.

use std::collections::BTreeSet;

use quote::ToTokens;

use crate::model::Args;

mod args;
mod signature;
mod versions;

pub(crate) use args::args;
pub(crate) use signature::form;

/// Collects errors; several mistakes give several messages at once.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    pub(super) fn spanned(&mut self, tokens: impl ToTokens, message: impl std::fmt::Display) {
        self.push(syn::Error::new_spanned(tokens, message));
    }

    pub(crate) fn into_result(self) -> Result<(), syn::Error> {
        self.0.map_or(Ok(()), Err)
    }
}

/// The arguments, plus the names that were given at all (even with a bad
/// value), so that a bad value is not also reported as missing.
pub(crate) struct CheckedArgs {
    pub(crate) args: Args,
    pub(super) seen: BTreeSet<String>,
}
