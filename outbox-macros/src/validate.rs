//! Checks the arguments and the function's signature and builds the model.
//! Every error is spanned on the offending token and worded as the fix; all
//! errors found are reported together.

use std::collections::BTreeSet;

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, quote};
use syn::spanned::Spanned as _;
use syn::{
    Expr, ExprLit, FnArg, GenericArgument, GenericParam, ItemFn, Lit, LitStr, PathArguments,
    ReturnType, Signature, Type, TypePath,
};

use crate::args::{PairName, RawArg, RawArgs, RawValue, example};
use crate::model::{Args, Consumer, Destination, Events, Form, Header, Named, Producer, TxParam};

use outbox_rules::DEFAULT_OUTBOX_TABLE;

const ARGUMENTS: &[&str] = &[
    "destination",
    "event_type",
    "key",
    "headers",
    "table",
    "pool",
    "consumer",
];

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

    fn spanned(&mut self, tokens: impl ToTokens, message: impl std::fmt::Display) {
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
    seen: BTreeSet<String>,
}

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
            "; expected `destination`, `event_type`, `key`, `headers`, `table` and `pool` \
             (producers) or `consumer`, `destination` and `table` (consumers)",
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

fn check_destination(
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

/// Decides the form from the arguments and checks the signature for it.
pub(crate) fn form(checked: CheckedArgs, func: ItemFn, errors: &mut Errors) -> Option<Form> {
    let CheckedArgs { args, seen } = checked;
    let is_consumer = seen.contains("consumer");
    if is_consumer {
        for name in [
            args.pool.as_ref(),
            args.event_type.as_ref().map(|n| &n.name),
            args.key.as_ref().map(|n| &n.name),
            args.headers.as_ref().map(|n| &n.name),
        ]
        .into_iter()
        .flatten()
        {
            errors.spanned(
                name,
                format_args!(
                    "`{name}` is a producer argument; a consumer (`consumer = …`) takes only \
                     `destination` and `table`: remove `{name}`"
                ),
            );
        }
        if !seen.contains("destination") {
            errors.push(syn::Error::new(
                Span::call_site(),
                "missing `destination`: the queue this consumer reads, e.g. \
                 `destination = \"/queue/Consumer.points.VirtualTopic.user.created\"`",
            ));
        }
    } else {
        let missing: Vec<&str> = ["destination", "event_type"]
            .into_iter()
            .filter(|name| !seen.contains(*name))
            .collect();
        let message = match missing.as_slice() {
            [] => None,
            ["destination"] => Some(
                "missing `destination`: where the events are published, e.g. \
                 `destination = \"/topic/VirtualTopic.user.created\"`"
                    .to_owned(),
            ),
            ["event_type"] => Some(
                "missing `event_type`: the type of the events, e.g. `event_type = \"user.created\"`"
                    .to_owned(),
            ),
            _ => Some(
                "missing `destination` and `event_type`: write \
                 `#[transactional_event(destination = \"/topic/VirtualTopic.user.created\", \
                 event_type = \"user.created\")]` for a producer, or \
                 `#[transactional_event(consumer = \"points\", destination = \"/queue/…\")]` \
                 for a consumer"
                    .to_owned(),
            ),
        };
        if let Some(message) = message {
            errors.push(syn::Error::new(Span::call_site(), message));
        }
    }
    let form = if is_consumer {
        consumer(args, func, errors).map(|c| Form::Consumer(Box::new(c)))
    } else {
        producer(args, func, errors).map(|p| Form::Producer(Box::new(p)))
    };
    // Argument errors were found before the signature was looked at.
    if errors.0.is_some() {
        return None;
    }
    form
}

fn producer(args: Args, func: ItemFn, errors: &mut Errors) -> Option<Producer> {
    let sig = &func.sig;
    common_signature(sig, false, errors);
    let tx = transaction_param(sig, errors);
    let output = result_type(sig, errors);
    let events = output.as_ref().and_then(|(_, ok, _)| {
        if is_unit(ok) {
            errors.spanned(
                ok,
                "`()` is not an event: return the event to append, e.g. \
                 `Result<UserCreated, Error>`, or several with `Result<Vec<UserCreated>, Error>`",
            );
            return None;
        }
        Some(match element(ok) {
            Some(element) => (Events::Each, element.span()),
            None => (Events::One, ok.span()),
        })
    });
    let (tx, (output, _, error_span), (events, event_span)) = (tx?, output?, events?);
    let (destination, event_type) = (args.destination?, args.event_type?);
    if let Destination::Literal(lit) = &destination.value
        && !check_destination(lit, outbox_rules::publish_destination, errors)
    {
        return None;
    }
    let table = match args.table {
        Some(t) => LitStr::new(&t.value.value().to_ascii_lowercase(), t.value.span()),
        None => LitStr::new(DEFAULT_OUTBOX_TABLE, Span::call_site()),
    };
    Some(Producer {
        func,
        tx,
        pool: args.pool,
        destination: destination.value,
        event_type: event_type.value,
        key: args.key.map(|k| k.value),
        headers: args.headers.map(|h| h.value).unwrap_or_default(),
        table,
        output,
        error_span,
        events,
        event_span,
    })
}

fn consumer(args: Args, func: ItemFn, errors: &mut Errors) -> Option<Consumer> {
    let sig = &func.sig;
    common_signature(sig, true, errors);
    let inputs = sig.inputs.len();
    let has_receiver = sig.inputs.iter().any(|a| matches!(a, FnArg::Receiver(_)));
    let arity_ok = !has_receiver && (2..=3).contains(&inputs);
    if !has_receiver && !arity_ok {
        let message = "a consumer takes `(tx: &mut Transaction<'_, DB>, event: E)`, \
                       or `(tx: &mut Transaction<'_, DB>, event: E, delivery: &Delivery)` \
                       to see the message's headers";
        if inputs > 3 {
            let extra: Vec<&FnArg> = sig.inputs.iter().skip(3).collect();
            errors.spanned(
                quote!(#(#extra),*),
                format_args!("too many parameters: {message}; remove these"),
            );
        } else {
            errors.push(syn::Error::new(
                sig.paren_token.span.join(),
                format_args!("too few parameters: {message}"),
            ));
        }
    }
    let tx = if arity_ok {
        transaction_param(sig, errors)
    } else {
        None
    };
    let event = match sig.inputs.iter().nth(1) {
        Some(FnArg::Typed(param)) if arity_ok => match strip(&param.ty) {
            Type::ImplTrait(_) => {
                errors.spanned(
                    &param.ty,
                    "the event needs a concrete type that implements `serde::Deserialize`, \
                     not `impl Trait`",
                );
                None
            }
            Type::Reference(reference) => {
                errors.spanned(
                    reference,
                    "take the event by value: the consumer decodes it for each delivery",
                );
                None
            }
            _ => Some((*param.ty).clone()),
        },
        _ => None,
    };
    let delivery = match sig.inputs.iter().nth(2) {
        Some(FnArg::Typed(param)) if arity_ok => {
            if !matches!(strip(&param.ty), Type::Reference(r) if r.mutability.is_none()) {
                errors.spanned(
                    &param.ty,
                    "take the delivery by shared reference: `delivery: &Delivery`",
                );
            }
            true
        }
        _ => false,
    };
    let output = result_type(sig, errors);
    if let Some((_, ok, _)) = &output
        && !is_unit(ok)
    {
        errors.spanned(
            ok,
            "a consumer returns `Result<(), E>`: it applies the event and returns nothing; \
             to publish events in turn, append them with `outbox::core::Outbox::append` \
             inside the same transaction",
        );
    }
    if errors.0.is_some() {
        return None;
    }
    let (tx, event, (_, _, error_span)) = (tx?, event?, output?);
    Some(Consumer {
        db: tx.db,
        event,
        delivery,
        error_span,
        consumer: args.consumer?.value,
        destination: args.destination?.value,
        table: args.table.map(|t| t.value),
        func,
    })
}

/// `async`, no `self`, no generics.
fn common_signature(sig: &Signature, consumer: bool, errors: &mut Errors) {
    if sig.asyncness.is_none() {
        errors.spanned(
            sig.fn_token,
            "`#[transactional_event]` needs an `async fn`: write `async fn`",
        );
    }
    if consumer && sig.unsafety.is_some() {
        errors.spanned(
            sig.unsafety,
            "a consumer cannot be an `unsafe fn`: the consumer runtime calls it; remove `unsafe`",
        );
    }
    for input in &sig.inputs {
        if let FnArg::Receiver(receiver) = input {
            errors.spanned(
                receiver,
                if consumer {
                    "`self` is not supported: a consumer is a free function \
                     `async fn(tx, event)`; reach shared state through statics or the database"
                } else {
                    "`self` is not supported: write a free function or an associated function \
                     without `self`, and pass the value as an ordinary parameter"
                },
            );
        }
    }
    let generics = &sig.generics;
    if consumer {
        if !generics.params.is_empty() || generics.where_clause.is_some() {
            errors.spanned(
                generics,
                "generic parameters are not supported: a consumer is registered for one \
                 database and one event type; write them out, e.g. `Transaction<'_, Sqlite>`",
            );
        }
    } else {
        for param in &generics.params {
            if !matches!(param, GenericParam::Lifetime(_)) {
                errors.spanned(
                    param,
                    "generic parameters are not supported: write the concrete types, \
                     e.g. `Transaction<'_, Sqlite>` (lifetime parameters are fine)",
                );
            }
        }
    }
}

/// The first parameter, which must be `&mut Transaction<'_, DB>`.
fn transaction_param(sig: &Signature, errors: &mut Errors) -> Option<TxParam> {
    const FIX: &str = "`tx: &mut sqlx::Transaction<'_, DB>`, where `DB` is your database, \
                       e.g. `sqlx::Sqlite`";
    let first = match sig.inputs.first() {
        None => {
            errors.push(syn::Error::new(
                sig.paren_token.span.join(),
                format_args!(
                    "missing the transaction parameter: the first parameter must be {FIX}"
                ),
            ));
            return None;
        }
        // Reported by `common_signature`.
        Some(FnArg::Receiver(_)) => return None,
        Some(FnArg::Typed(param)) => param,
    };
    let ty = strip(&first.ty);
    let (mutable, path) = match ty {
        Type::Reference(r) => (r.mutability.is_some(), as_path(&r.elem)),
        other => (false, as_path(other)),
    };
    let last = path.and_then(|p| p.path.segments.last());
    let name = last.map(|s| s.ident.to_string());
    match name.as_deref() {
        Some("Transaction") if mutable => {
            let db = last.and_then(|s| match &s.arguments {
                PathArguments::AngleBracketed(args) => {
                    args.args.iter().rev().find_map(|a| match a {
                        GenericArgument::Type(t) => Some(t.clone()),
                        _ => None,
                    })
                }
                _ => None,
            });
            match db {
                Some(db) => Some(TxParam {
                    pat: (*first.pat).clone(),
                    ty: (*first.ty).clone(),
                    db,
                }),
                None => {
                    errors.spanned(
                        &first.ty,
                        "name the database of the transaction: `&mut Transaction<'_, DB>`, \
                         e.g. `Transaction<'_, sqlx::Sqlite>`",
                    );
                    None
                }
            }
        }
        Some("Transaction") => {
            errors.spanned(
                &first.ty,
                "take the transaction by mutable reference: `&mut Transaction<'_, DB>`",
            );
            None
        }
        Some("Pool" | "SqlitePool" | "PgPool" | "MySqlPool") => {
            errors.spanned(
                &first.ty,
                "the first parameter must be the transaction, `tx: &mut Transaction<'_, DB>`; \
                 for a function that takes a pool and begins and commits the transaction \
                 itself, keep `tx` here and add `pool`: `#[transactional_event(pool, …)]`",
            );
            None
        }
        _ => {
            errors.spanned(
                &first.ty,
                format_args!("the first parameter must be the transaction: {FIX}"),
            );
            None
        }
    }
}

/// `Result<Ok, Err>` (any path whose last segment ends in `Result`, so that
/// aliases such as `ShopResult<T>` pass): the whole type, the `Ok` type and
/// the span of the error type (of the whole type for an alias).
fn result_type(sig: &Signature, errors: &mut Errors) -> Option<(Type, Type, Span)> {
    const FIX: &str = "return a `Result`, e.g. `-> Result<UserCreated, MyError>` \
                       where `MyError: From<outbox::core::Error>`";
    let ty = match &sig.output {
        ReturnType::Default => {
            errors.push(syn::Error::new(
                sig.paren_token.span.close(),
                format_args!("missing return type: {FIX}"),
            ));
            return None;
        }
        ReturnType::Type(_, ty) => ty,
    };
    let last = as_path(strip(ty)).and_then(|p| p.path.segments.last());
    let args = match last {
        // `Result`, or an alias named like one (`anyhow::Result<T>`, `ShopResult<T>`).
        Some(segment) if segment.ident.to_string().ends_with("Result") => {
            match &segment.arguments {
                PathArguments::AngleBracketed(args) => Some(args),
                _ => None,
            }
        }
        _ => None,
    };
    let mut types = args
        .into_iter()
        .flat_map(|a| a.args.iter())
        .filter_map(|a| match a {
            GenericArgument::Type(t) => Some(t),
            _ => None,
        });
    let Some(ok) = types.next() else {
        errors.spanned(ty, format_args!("expected a `Result`: {FIX}"));
        return None;
    };
    let error_span = types.next().map_or_else(|| ty.span(), Type::span);
    Some(((**ty).clone(), ok.clone(), error_span))
}

/// Looks through invisible groups and parentheses.
fn strip(ty: &Type) -> &Type {
    match ty {
        Type::Group(g) => strip(&g.elem),
        Type::Paren(p) => strip(&p.elem),
        other => other,
    }
}

fn as_path(ty: &Type) -> Option<&TypePath> {
    match strip(ty) {
        Type::Path(path) if path.qself.is_none() => Some(path),
        _ => None,
    }
}

fn is_unit(ty: &Type) -> bool {
    matches!(strip(ty), Type::Tuple(t) if t.elems.is_empty())
}

/// `E` of `Vec<E>` or `Option<E>`, recognised by name.
fn element(ty: &Type) -> Option<&Type> {
    let segment = as_path(ty)?.path.segments.last()?;
    if segment.ident != "Vec" && segment.ident != "Option" {
        return None;
    }
    match &segment.arguments {
        PathArguments::AngleBracketed(args) if args.args.len() == 1 => match &args.args[0] {
            GenericArgument::Type(element) => Some(element),
            _ => None,
        },
        _ => None,
    }
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
