//! `version = N` and `upcast(v1 = OldType, …)`: the version a producer sends,
//! and the versions a consumer reads.

use proc_macro2::TokenStream;
use quote::ToTokens;
use syn::{Expr, ExprLit, Lit};

use super::Errors;
use crate::args::{PairName, RawArg, RawValue};
use crate::model::{Named, Upcast};

/// `version = N`: a whole number from 1.
pub(super) fn version(arg: RawArg, errors: &mut Errors) -> Option<Named<u32>> {
    let name = arg.name;
    let value = match arg.value {
        RawValue::Expr(_, value) => value,
        other => {
            let at: TokenStream = match other {
                RawValue::List(paren, _) => {
                    errors.push(syn::Error::new(
                        paren.span.join(),
                        "`version` takes `= N`, not a list: write e.g. `version = 2`",
                    ));
                    return None;
                }
                _ => name.to_token_stream(),
            };
            errors.spanned(at, "`version` needs a number: write e.g. `version = 2`");
            return None;
        }
    };
    let number = match &value {
        Expr::Lit(ExprLit {
            lit: Lit::Int(int), ..
        }) => int.base10_parse::<u32>().ok().filter(|n| *n >= 1),
        _ => None,
    };
    if number.is_none() {
        errors.spanned(
            &value,
            "`version` takes a whole number literal from 1: write e.g. `version = 2`",
        );
    }
    number.map(|value| Named { name, value })
}

/// `upcast(v1 = UserCreatedV1, …)`: each older version and the type its
/// payloads decode as.
pub(super) fn upcast(arg: RawArg, errors: &mut Errors) -> Option<Named<Vec<Upcast>>> {
    let name = arg.name;
    let RawValue::List(_, pairs) = arg.value else {
        errors.spanned(
            &name,
            "`upcast` takes a list of older versions and their types: \
             write e.g. `upcast(v1 = UserCreatedV1)`",
        );
        return None;
    };
    let mut upcasts = Vec::new();
    let mut ok = true;
    for pair in pairs {
        let version = match &pair.name {
            PairName::Ident(ident) => ident
                .to_string()
                .strip_prefix('v')
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| *n >= 1),
            PairName::Str(_) => None,
        };
        let ty = match &pair.value {
            Expr::Path(path) => Some(path.clone()),
            _ => None,
        };
        match (version, ty) {
            (Some(version), Some(ty)) => {
                if upcasts.iter().any(|u: &Upcast| u.version == version) {
                    errors.spanned(
                        &pair.value,
                        format_args!("version {version} is given twice in `upcast`: keep one"),
                    );
                    ok = false;
                }
                upcasts.push(Upcast { version, ty });
            }
            (None, _) => {
                let at = match &pair.name {
                    PairName::Ident(ident) => ident.to_token_stream(),
                    PairName::Str(lit) => lit.to_token_stream(),
                };
                errors.spanned(
                    at,
                    "name each older version `v` and its number: write e.g. `v1 = UserCreatedV1`",
                );
                ok = false;
            }
            (_, None) => {
                errors.spanned(
                    &pair.value,
                    "give the type version's payloads decode as (it converts into the event \
                     with `From`): write e.g. `v1 = UserCreatedV1`",
                );
                ok = false;
            }
        }
    }
    ok.then_some(Named {
        name,
        value: upcasts,
    })
}

/// A consumer's versions: `version` alone reads that one only; `upcast`
/// needs `version`, and each of its versions is older than it.
pub(super) fn consumer_versions(
    version: Option<Named<u32>>,
    upcast: Option<Named<Vec<Upcast>>>,
    errors: &mut Errors,
) -> Option<(u32, Vec<Upcast>)> {
    let Some(version) = version else {
        if let Some(upcast) = upcast {
            errors.spanned(
                &upcast.name,
                "`upcast` needs `version = N`, the version the handler's event type is: \
                 write e.g. `version = 2, upcast(v1 = UserCreatedV1)`",
            );
        }
        return None;
    };
    let upcasts = upcast.map(|u| u.value).unwrap_or_default();
    for up in &upcasts {
        if up.version >= version.value {
            errors.spanned(
                &up.ty,
                format_args!(
                    "`upcast` lists older versions: v{} is not older than `version = {}`",
                    up.version, version.value
                ),
            );
        }
    }
    Some((version.value, upcasts))
}
