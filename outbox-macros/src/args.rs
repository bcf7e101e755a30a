//! Parsing the attribute's arguments: `name = value`, `name(list)` and bare
//! `name`, separated by commas. Parsing is purely syntactic; which names exist
//! and what each one takes is checked in `model`.

use syn::ext::IdentExt as _;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Expr, Ident, LitStr, Token, token};

/// The whole argument list.
pub(crate) struct RawArgs {
    pub(crate) args: Punctuated<RawArg, Token![,]>,
}

/// One argument as written.
pub(crate) struct RawArg {
    pub(crate) name: Ident,
    pub(crate) value: RawValue,
}

/// What follows an argument's name.
pub(crate) enum RawValue {
    /// Nothing: a flag such as `pool`.
    Flag,
    /// `= expression`.
    Expr(Token![=], Expr),
    /// `( items )`, as in `headers(tenant = "acme")`.
    List(token::Paren, Punctuated<RawPair, Token![,]>),
}

/// One `name = value` item inside a list.
pub(crate) struct RawPair {
    pub(crate) name: PairName,
    pub(crate) value: Expr,
}

/// A header name: an identifier (`tenant`) or a string (`"x-tenant"`).
pub(crate) enum PairName {
    Ident(Ident),
    Str(LitStr),
}

impl Parse for RawArgs {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        Ok(RawArgs {
            args: Punctuated::parse_terminated(input)?,
        })
    }
}

impl Parse for RawArg {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        // Keywords are accepted as names so that `type = "…"` gets a helpful
        // "unknown argument" error instead of a parse error.
        let name = input.call(Ident::parse_any).map_err(|e| {
            syn::Error::new(
                e.span(),
                "expected an argument such as `destination = \"/topic/…\"`",
            )
        })?;
        let value = if input.peek(Token![=]) {
            let eq = input.parse()?;
            if input.is_empty() || input.peek(Token![,]) {
                return Err(input.error(format!(
                    "`{name} =` needs a value after the `=`, e.g. `{}`",
                    example(&name.to_string())
                )));
            }
            RawValue::Expr(eq, input.parse()?)
        } else if input.peek(token::Paren) {
            let content;
            let paren = syn::parenthesized!(content in input);
            RawValue::List(paren, Punctuated::parse_terminated(&content)?)
        } else if input.is_empty() || input.peek(Token![,]) {
            RawValue::Flag
        } else {
            return Err(input.error(format!(
                "expected `=` after `{name}`: write `{}`",
                example(&name.to_string())
            )));
        };
        Ok(RawArg { name, value })
    }
}

impl Parse for RawPair {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let name = if input.peek(LitStr) {
            PairName::Str(input.parse()?)
        } else if input.peek(Ident::peek_any) {
            PairName::Ident(input.call(Ident::parse_any)?)
        } else {
            return Err(input.error(
                "expected a header `name = \"value\"`; write names that are not \
                 identifiers as strings: `\"x-tenant\" = \"acme\"`",
            ));
        };
        if !input.peek(Token![=]) {
            return Err(input.error("expected `=` and the header's value: `name = \"value\"`"));
        }
        input.parse::<Token![=]>()?;
        Ok(RawPair {
            name,
            value: input.parse()?,
        })
    }
}

/// How an argument is written, for error messages.
pub(crate) fn example(name: &str) -> &'static str {
    match name {
        "destination" => "destination = \"/topic/VirtualTopic.user.created\"",
        "event_type" => "event_type = \"user.created\"",
        "key" => "key = event.user_id",
        "headers" => "headers(tenant = \"acme\")",
        "table" => "table = \"outbox_event\"",
        "consumer" => "consumer = \"points\"",
        "pool" => "pool",
        "version" => "version = 2",
        "upcast" => "upcast(v1 = UserCreatedV1)",
        _ => "name = \"value\"",
    }
}
