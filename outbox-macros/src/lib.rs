//! The `#[transactional_event]` attribute macro of the outbox framework. Use it
//! through the `outbox` crate, which documents it: `outbox::transactional_event`.
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod args;
mod expand;
mod model;
mod validate;

use proc_macro::TokenStream;

// The manual is tested as doctests of the `outbox` crate's re-export, where
// the `outbox` paths the examples use exist.
#[cfg_attr(not(doctest), doc = include_str!("../manual.md"))]
#[proc_macro_attribute]
pub fn transactional_event(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::transactional_event(attr.into(), item.into()).into()
}
