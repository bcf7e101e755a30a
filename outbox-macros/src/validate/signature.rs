//! The function's form and signature, checked against the arguments.

use proc_macro2::Span;
use quote::quote;
use syn::spanned::Spanned as _;
use syn::{
    FnArg, GenericArgument, GenericParam, ItemFn, LitStr, PathArguments, ReturnType, Signature,
    Type, TypePath,
};

use crate::model::{Args, Consumer, Destination, Events, Form, Producer, TxParam};

use outbox_rules::DEFAULT_OUTBOX_TABLE;

use super::args::check_destination;
use super::{CheckedArgs, Errors};

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
                     `destination`, `table`, `version` and `upcast`: remove `{name}`"
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
    if let Some(upcast) = &args.upcast {
        errors.spanned(
            &upcast.name,
            "`upcast` is a consumer argument (the older versions a consumer reads); \
             a producer sends one version: remove `upcast`",
        );
    }
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
        version: args.version.map(|v| v.value),
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
    let versions = super::versions::consumer_versions(args.version, args.upcast, errors);
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
        versions,
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
