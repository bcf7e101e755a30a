//! The attribute's arguments: names, duplicates and the kind of each value.

use std::collections::BTreeSet;

use proc_macro2::TokenStream;
use quote::{ToTokens, quote};
use syn::{Expr, ExprLit, Lit, LitStr};

use crate::args::{PairName, RawArg, RawArgs, RawValue, example};
use crate::model::{Args, Destination, Header, Named};

use super::{CheckedArgs, Errors};

const ARGUMENTS: &[&str] = &[
    "destination",
    "event_type",
    "key",
    "headers",
    "table",
    "pool",
    "consumer",
    "version",
    "upcast",
];

/// Checks names, duplicates and the kind of each value.
pub(crate) fn args(raw: RawArgs, errors: &mut Errors) -> CheckedArgs {
    let mut args = Args::default();
    let mut seen = BTreeSet::new();
    for arg in raw.args {
        let name = arg.name.to_string();
        if !ARGUMENTS.contains(&name.as_str()) {
            let suggestion = suggestion(&name);
            errors.spanned(&arg.name, unknown_argument(&name, suggestion));
            // The suggested argument is not reported missing as well.
            seen.extend(suggestion.map(str::to_owned));
            continue;
        }
        if !seen.insert(name.clone()) {
            errors.spanned(
                &arg.name,
                format_args!("duplicate argument `{name}`: give it once and remove this one"),
            );
            continue;
        }
        match name.as_str() {
            "pool" => {
                if flag(&arg, errors) {
                    args.pool = Some(arg.name);
                }
            }
            "key" => args.key = expression(arg, errors),
            "headers" => args.headers = headers(arg, errors),
            "destination" => args.destination = destination(arg, errors),
            "event_type" => {
                args.event_type = string(arg, errors).filter(|t| {
                    check_len(&t.value, "event type", outbox_rules::MAX_EVENT_TYPE, errors)
                        && check_no_control(&t.value, "event type", errors)
                })
            }
            "table" => args.table = string(arg, errors).filter(|t| check_table(&t.value, errors)),
            "consumer" => {
                args.consumer = string(arg, errors).filter(|c| check_consumer(&c.value, errors))
            }
            "version" => args.version = super::versions::version(arg, errors),
            "upcast" => args.upcast = super::versions::upcast(arg, errors),
            _ => unreachable!("every known argument is handled"),
        }
    }
    CheckedArgs { args, seen }
}

/// The argument a misspelt or guessed name probably means.
fn suggestion(name: &str) -> Option<&'static str> {
    match name {
        "topic" | "queue" | "dest" | "to" => Some("destination"),
        "type" | "kind" | "name" | "event" => Some("event_type"),
        "group" | "partition_key" | "event_key" => Some("key"),
        "header" => Some("headers"),
        "outbox" | "outbox_table" | "inbox" | "inbox_table" => Some("table"),
        "transaction" | "tx" => Some("pool"),
        _ => ARGUMENTS
            .iter()
            .copied()
            .filter(|known| edit_distance(name, known) <= 2)
            .min_by_key(|known| edit_distance(name, known)),
    }
}

fn unknown_argument(name: &str, suggestion: Option<&str>) -> String {
    let mut message = format!("unknown argument `{name}`");
    match suggestion {
        Some(known) => {
            message.push_str(&format!("; did you mean `{}`?", example(known)));
        }
        None => message.push_str(
            "; expected `destination`, `event_type`, `key`, `headers`, `table`, `pool` and \
             `version` (producers) or `consumer`, `destination`, `table`, `version` and \
             `upcast` (consumers)",
        ),
    }
    message
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// A bare flag such as `pool`.
fn flag(arg: &RawArg, errors: &mut Errors) -> bool {
    let name = &arg.name;
    match &arg.value {
        RawValue::Flag => true,
        RawValue::Expr(eq, expr) => {
            errors.spanned(
                quote!(#eq #expr),
                format_args!("`{name}` takes no value: write just `{name}`"),
            );
            false
        }
        RawValue::List(paren, _) => {
            errors.push(syn::Error::new(
                paren.span.join(),
                format_args!("`{name}` takes no value: write just `{name}`"),
            ));
            false
        }
    }
}

/// `name = "string literal"`.
fn string(arg: RawArg, errors: &mut Errors) -> Option<Named<LitStr>> {
    let name = arg.name;
    let fix = example(&name.to_string());
    match arg.value {
        RawValue::Expr(
            _,
            Expr::Lit(ExprLit {
                lit: Lit::Str(value),
                ..
            }),
        ) => return Some(Named { name, value }),
        RawValue::Expr(_, Expr::Lit(literal)) => errors.spanned(
            literal,
            format_args!("`{name}` takes a string literal: write `{fix}`"),
        ),
        RawValue::Expr(_, expr) if name == "destination" => errors.spanned(
            expr,
            format_args!(
                "`destination` takes a string literal or the path of a `const &str`, not an \
                 expression: write `{fix}`"
            ),
        ),
        RawValue::Expr(_, expr) => errors.spanned(
            expr,
            format_args!(
                "`{name}` takes a string literal, not an expression or a constant: write `{fix}`"
            ),
        ),
        RawValue::Flag => {
            errors.spanned(&name, format_args!("`{name}` needs a value: write `{fix}`"))
        }
        RawValue::List(paren, _) => errors.push(syn::Error::new(
            paren.span.join(),
            format_args!("`{name}` takes `= \"…\"`, not a list: write `{fix}`"),
        )),
    }
    None
}

/// `destination = "/queue/…"`, or the path of a `const &str`. A literal is
/// checked here against the rule every consumer and producer destination
/// follows (`outbox_rules::destination`); a producer's also against the
/// publishing rule, in [`producer`].
fn destination(arg: RawArg, errors: &mut Errors) -> Option<Named<Destination>> {
    if let RawValue::Expr(_, Expr::Path(path)) = &arg.value
        && path.qself.is_none()
    {
        return Some(Named {
            name: arg.name,
            value: Destination::Const(path.clone()),
        });
    }
    let named = string(arg, errors)?;
    check_destination(&named.value, outbox_rules::destination, errors).then(|| Named {
        name: named.name,
        value: Destination::Literal(named.value),
    })
}

pub(super) fn check_destination(
    value: &LitStr,
    rule: fn(&str) -> Result<(), &'static str>,
    errors: &mut Errors,
) -> bool {
    let text = value.value();
    if let Err(reason) = rule(&text) {
        errors.spanned(
            value,
            format_args!("invalid destination {text:?}: {reason}"),
        );
        return false;
    }
    true
}

/// `key = expression`.
fn expression(arg: RawArg, errors: &mut Errors) -> Option<Named<Expr>> {
    let name = arg.name;
    match arg.value {
        RawValue::Expr(_, value) => {
            not_a_non_string_literal(&value, "the key", errors).then_some(Named { name, value })
        }
        RawValue::Flag => {
            errors.spanned(
                &name,
                "`key` needs a value: an expression over `event`, e.g. `key = event.user_id`",
            );
            None
        }
        RawValue::List(paren, _) => {
            errors.push(syn::Error::new(
                paren.span.join(),
                "`key` takes `= expression`, not a list: write e.g. `key = event.user_id`",
            ));
            None
        }
    }
}

/// Refuses `42` or `true` where a `Display` value over `event` is expected.
fn not_a_non_string_literal(value: &Expr, what: &str, errors: &mut Errors) -> bool {
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Str(_), ..
        }) => true,
        Expr::Lit(ExprLit { lit, .. }) => {
            errors.spanned(
                lit,
                format_args!(
                    "{what} must be a string: write it in quotes, or use an expression over \
                     `event` such as `event.user_id`"
                ),
            );
            false
        }
        _ => true,
    }
}

/// `headers(name = value, "x-name" = value)`.
fn headers(arg: RawArg, errors: &mut Errors) -> Option<Named<Vec<Header>>> {
    let name = arg.name;
    let RawValue::List(_, pairs) = arg.value else {
        let at: TokenStream = match arg.value {
            RawValue::Expr(eq, expr) => quote!(#eq #expr),
            _ => name.to_token_stream(),
        };
        errors.spanned(
            at,
            "`headers` takes a list: write `headers(tenant = \"acme\", \"x-source\" = \"billing\")`",
        );
        return None;
    };
    let mut headers: Vec<Header> = Vec::new();
    let mut ok = true;
    for pair in pairs {
        let header = match pair.name {
            PairName::Ident(ident) => {
                LitStr::new(&syn::ext::IdentExt::unraw(&ident).to_string(), ident.span())
            }
            PairName::Str(lit) => lit,
        };
        let text = header.value();
        if text.is_empty() || text.chars().any(char::is_control) {
            errors.spanned(
                &header,
                "a header name must be non-empty and without control characters",
            );
            ok = false;
        } else if outbox_rules::is_reserved_header(&text) {
            errors.spanned(
                &header,
                format_args!(
                    "header `{text}` is set by the framework; choose another name \
                     (destination, event type and key have their own arguments)"
                ),
            );
            ok = false;
        } else if headers.iter().any(|h| h.name.value() == text) {
            errors.spanned(
                &header,
                format_args!("duplicate header `{text}`: give it once"),
            );
            ok = false;
        }
        ok &= not_a_non_string_literal(&pair.value, "a header value", errors);
        headers.push(Header {
            name: header,
            value: pair.value,
        });
    }
    ok.then_some(Named {
        name,
        value: headers,
    })
}

fn check_len(value: &LitStr, what: &str, max: usize, errors: &mut Errors) -> bool {
    let len = value.value().len();
    if len == 0 || len > max {
        errors.spanned(
            value,
            format_args!("the {what} must be 1 to {max} bytes long"),
        );
        return false;
    }
    true
}

fn check_no_control(value: &LitStr, what: &str, errors: &mut Errors) -> bool {
    if value.value().chars().any(char::is_control) {
        errors.spanned(
            value,
            format_args!("the {what} must not contain control characters such as newlines"),
        );
        return false;
    }
    true
}

/// The rules of `outbox_core::TableName` ([`outbox_rules::table_name`]).
fn check_table(value: &LitStr, errors: &mut Errors) -> bool {
    let name = value.value();
    if let Err(reason) = outbox_rules::table_name(&name) {
        errors.spanned(value, format_args!("invalid table name {name:?}: {reason}"));
        return false;
    }
    true
}

/// The rules of `outbox_core`'s consumer names ([`outbox_rules::consumer_name`]).
fn check_consumer(value: &LitStr, errors: &mut Errors) -> bool {
    let name = value.value();
    if let Err(reason) = outbox_rules::consumer_name(&name) {
        errors.spanned(
            value,
            format_args!("invalid consumer name {name:?}: {reason}"),
        );
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_and_usual_names_are_suggested() {
        assert_eq!(suggestion("destinaton"), Some("destination"));
        assert_eq!(suggestion("event_typ"), Some("event_type"));
        assert_eq!(suggestion("topic"), Some("destination"));
        assert_eq!(suggestion("type"), Some("event_type"));
        assert_eq!(suggestion("retries"), None);
    }

    #[test]
    fn edit_distance_counts_single_character_edits() {
        assert_eq!(edit_distance("key", "key"), 0);
        assert_eq!(edit_distance("kye", "key"), 2);
        assert_eq!(edit_distance("tabel", "table"), 2);
        assert_eq!(edit_distance("", "pool"), 4);
    }
}
