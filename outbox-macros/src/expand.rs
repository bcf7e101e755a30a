//! Code generation. Generated code names everything by absolute path
//! (`::outbox::__private::…`, `::core::…`, `::std::…`) and its own local
//! variables with mixed-site hygiene, so it cannot clash with the user's names.
//! The user's function body is passed through untouched.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned as _;
use syn::{FnArg, Ident, ItemFn, Pat};

use crate::args::RawArgs;
use crate::model::{Consumer, Destination, Events, Form, Producer};
use crate::validate::{self, Errors};

/// The whole macro: the annotated function and what it generates, or the
/// errors beside the unchanged function.
pub(crate) fn transactional_event(attr: TokenStream, item: TokenStream) -> TokenStream {
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(func) => func,
        Err(_) => {
            let error = syn::Error::new(
                Span::call_site(),
                "`#[transactional_event]` goes on an `async fn` with a body",
            )
            .to_compile_error();
            return quote!(#error #item);
        }
    };
    let raw: RawArgs = match syn::parse2(attr) {
        Ok(raw) => raw,
        Err(error) => return fallback(&error, &func),
    };
    let mut errors = Errors::default();
    let checked = validate::args(raw, &mut errors);
    match validate::form(checked, func.clone(), &mut errors) {
        Some(Form::Producer(producer)) => expand_producer(&producer),
        Some(Form::Consumer(consumer)) => expand_consumer(&consumer),
        None => {
            let error = errors.into_result().err().unwrap_or_else(|| {
                syn::Error::new(
                    Span::call_site(),
                    "`#[transactional_event]` could not understand this function",
                )
            });
            fallback(&error, &func)
        }
    }
}

/// The errors beside the user's function, so that one mistake gives one
/// message and the rest of the crate still sees the function.
fn fallback(error: &syn::Error, func: &ItemFn) -> TokenStream {
    let error = error.to_compile_error();
    quote!(#error #func)
}

/// A local variable of the generated code, invisible to the user's code.
fn local(name: &str) -> Ident {
    Ident::new(name, Span::mixed_site())
}

/// The same variable, reported at `location` in errors about its use.
fn at(ident: &Ident, location: Span) -> Ident {
    let mut moved = ident.clone();
    moved.set_span(ident.span().located_at(location));
    moved
}

fn expand_producer(p: &Producer) -> TokenStream {
    let ItemFn {
        attrs,
        vis,
        sig,
        block,
    } = &p.func;
    let mut sig = sig.clone();
    let db = &p.tx.db;
    let user_pat = &p.tx.pat;
    let output = &p.output;
    let table = &p.table;
    let (event_type, destination) = (&p.event_type, &p.destination);
    let (tx, result, value, events, built, error, source) = (
        // The transaction parameter keeps the user's name in the docs.
        match &p.tx.pat {
            Pat::Ident(ident) if p.pool.is_none() => {
                let mut tx = ident.ident.clone();
                tx.set_span(Span::mixed_site());
                tx
            }
            _ => local("tx"),
        },
        local("result"),
        local("value"),
        local("events"),
        local("built"),
        local("error"),
        local("source"),
    );
    let fail = |e: &Ident| return_user_error(e, output, p.error_span);

    // In the pool form the transaction keeps the type the user wrote for it.
    let user_ty = p.pool.as_ref().map(|_| {
        let ty = &p.tx.ty;
        quote!(: #ty)
    });
    let pool = Ident::new("pool", Span::mixed_site());
    let (first, begin, tx_ref, commit): (FnArg, _, _, _) = match &p.pool {
        Some(flag) => {
            let begin_failed = fail(&error);
            let commit_failed = fail(&error);
            (
                syn::parse_quote_spanned!(flag.span()=>
                    #pool: &::outbox::__private::sqlx::Pool<#db>
                ),
                quote! {
                    let mut #tx = match <#db as ::outbox::__private::Backend>::begin_write(#pool).await {
                        ::core::result::Result::Ok(#tx) => #tx,
                        ::core::result::Result::Err(#source) => {
                            let #error = ::outbox::__private::Error::Database {
                                action: "beginning the transaction of a #[transactional_event] function",
                                source: #source,
                            };
                            #begin_failed
                        }
                    };
                },
                quote!(&mut #tx),
                quote! {
                    if let ::core::result::Result::Err(#source) = #tx.commit().await {
                        let #error = ::outbox::__private::Error::Database {
                            action: "committing the transaction of a #[transactional_event] function",
                            source: #source,
                        };
                        #commit_failed
                    }
                    ::outbox::__private::wake(#table);
                },
            )
        }
        None => {
            // The parameter as written, with a name the body cannot see.
            let mut param = match sig.inputs.first() {
                Some(FnArg::Typed(param)) => param.clone(),
                _ => unreachable!("validated: the first parameter is the transaction"),
            };
            param.pat = Box::new(syn::parse_quote!(#tx));
            (
                FnArg::Typed(param),
                TokenStream::new(),
                quote!(&mut *#tx),
                TokenStream::new(),
            )
        }
    };
    if let Some(slot) = sig.inputs.first_mut() {
        *slot = first;
    }

    // `event` names each event in `key` and header expressions.
    let event = format_ident!("event");
    let event_arg = at(&event, p.event_span);
    let each = match p.events {
        Events::One => quote!(::core::iter::once(&#value)),
        Events::Each => quote!(::core::iter::IntoIterator::into_iter(&#value)),
    };
    let key = p.key.as_ref().map(|key| {
        quote_spanned! {key.span()=>
            .with_key(::std::string::ToString::to_string(&(#key)))
        }
    });
    let headers = p.headers.iter().map(|header| {
        let (name, value) = (&header.name, &header.value);
        quote_spanned! {value.span()=>
            .with_header(#name, ::std::string::ToString::to_string(&(#value)))
        }
    });
    let version = p.version.map(|version| quote!(.with_version(#version)));
    let serialize_failed = fail(&error);
    let append_failed = fail(&error);
    // The pool form names its pool, so a relay of this process on that pool
    // can take the rows without a claim.
    let append = match &p.pool {
        Some(_) => quote! {
            ::outbox::__private::append_to_pool_table(#pool, #tx_ref, #table, &#events).await
        },
        None => quote! {
            ::outbox::__private::append_to_table(#tx_ref, #table, &#events).await
        },
    };

    let checked = const_check(&p.destination, "assert_publish_destination");

    quote! {
        #(#attrs)*
        #vis #sig {
            #checked
            #begin
            let #result: #output = {
                let #user_pat #user_ty = #tx_ref;
                async move #block
            }
            .await;
            let #value = match #result {
                ::core::result::Result::Ok(#value) => #value,
                ::core::result::Result::Err(#error) => return ::core::result::Result::Err(#error),
            };
            let mut #events = ::std::vec::Vec::new();
            for #event in #each {
                let #built = match ::outbox::__private::Event::json(#event_type, #destination, #event_arg) {
                    ::core::result::Result::Ok(#built) => #built,
                    ::core::result::Result::Err(#error) => #serialize_failed,
                };
                #events.push(#built #key #(#headers)* #version);
            }
            if let ::core::result::Result::Err(#error) = #append {
                #append_failed
            }
            #commit
            ::core::result::Result::Ok(#value)
        }
    }
}

/// `return Err(…)` of the framework's error `e` as the user's error type:
/// directly (`From<outbox::core::Error>`) or through `sqlx::Error`, chosen by
/// `outbox_core`'s reference ladder; a type that takes neither is reported
/// at the error type (`error_span`).
fn return_user_error(e: &Ident, output: &syn::Type, error_span: Span) -> TokenStream {
    let here = e.span().located_at(error_span);
    let e = at(e, error_span);
    let converted = local("converted");
    quote_spanned! {here=>
        return ::core::result::Result::Err({
            #[allow(unused_imports)]
            use ::outbox::__private::{NoConversion as _, ViaOutboxError as _, ViaSqlxError as _};
            // The extra references select the rule.
            #[allow(clippy::needless_borrow)]
            let #converted = (&&::outbox::__private::ErrorInto::<
                <#output as ::outbox::__private::ProducerResult>::Err,
            >::new())
            .into_user_error(#e);
            #converted
        })
    }
}

/// For a destination given as a `const`: a `const _` that checks it with
/// `outbox::__private::<assert>` when the constant is evaluated.
fn const_check(destination: &Destination, assert: &str) -> TokenStream {
    match destination {
        Destination::Const(path) => {
            // Spanned at the path, so that the error points at it.
            let assert = Ident::new(assert, path.span());
            quote_spanned! {path.span()=>
                const _: () = ::outbox::__private::#assert(#path);
            }
        }
        Destination::Literal(_) => TokenStream::new(),
    }
}

fn expand_consumer(c: &Consumer) -> TokenStream {
    let func = &c.func;
    let vis = &func.vis;
    let function = &func.sig.ident;
    let name = Ident::new(&upper_camel_case(function), function.span());
    let (db, event) = (&c.db, &c.event);
    let (consumer, destination) = (&c.consumer, &c.destination);
    let table = match &c.table {
        Some(table) => quote!(#table),
        None => quote!(::outbox::__private::DEFAULT_INBOX_TABLE),
    };
    let delivery_arg = c.delivery.then(|| quote!(, delivery));
    let error = at(&local("error"), c.error_span);
    let into = quote_spanned!(error.span()=>
        ::core::convert::Into::<::outbox::__private::HandlerError>::into(#error)
    );
    let fn_name = function.to_string();
    let struct_doc = format!(
        " The inbox consumer `{}` of {}: applies each event with [`{fn_name}`](fn@{fn_name}), \
         exactly once per event id.",
        consumer.value(),
        destination.describe(),
    );
    let struct_doc_more = format!(
        " Generated by `#[transactional_event]`. Run it with \
         `{name}::consumer(pool)?.spawn(client).await?`; create its inbox table first with \
         `{name}::inbox(pool)?.migrate().await?`."
    );
    let consumer_doc = format!(
        " The consumer name recorded in the inbox: `{:?}`.",
        consumer.value()
    );
    let destination_doc = format!(
        " The queue this consumer reads: {}.",
        destination.describe()
    );
    let checked = const_check(destination, "assert_destination");
    let decode = match &c.versions {
        None => quote!(::outbox::__private::decode_json::<#event>(delivery)),
        Some((version, upcasts)) => {
            let older = upcasts.iter().map(|up| {
                let (v, ty) = (up.version, &up.ty);
                quote_spanned!(ty.span()=> .upcast::<#ty>(#v))
            });
            quote! {
                ::outbox::__private::Versions::<#event>::new(#version)
                    #(#older)*
                    .decode(delivery)
            }
        }
    };
    quote! {
        #func

        #checked

        #[doc = #struct_doc]
        ///
        #[doc = #struct_doc_more]
        #[derive(
            ::core::fmt::Debug,
            ::core::clone::Clone,
            ::core::marker::Copy,
            ::core::default::Default,
        )]
        #vis struct #name;

        #[allow(dead_code)]
        impl #name {
            #[doc = #consumer_doc]
            #vis const CONSUMER: &str = #consumer;
            #[doc = #destination_doc]
            #vis const DESTINATION: &str = #destination;
            /// The inbox table.
            #vis const INBOX_TABLE: &str = #table;

            /// This consumer's inbox in `pool` (call `migrate` on it before the first run).
            #vis fn inbox(
                pool: ::outbox::__private::sqlx::Pool<#db>,
            ) -> ::core::result::Result<::outbox::__private::Inbox<#db>, ::outbox::__private::Error> {
                ::outbox::__private::Inbox::with_table(pool, Self::CONSUMER, Self::INBOX_TABLE)
            }

            /// The consumer with default settings for its destination; start it
            /// with `spawn(client)`.
            #vis fn consumer(
                pool: ::outbox::__private::sqlx::Pool<#db>,
            ) -> ::core::result::Result<
                ::outbox::__private::Consumer<#db, Self>,
                ::outbox::__private::Error,
            > {
                Self::consumer_with(pool, ::outbox::__private::ConsumerConfig::new(Self::DESTINATION))
            }

            /// The consumer with the given settings, e.g.
            /// `ConsumerConfig::new(Self::DESTINATION).with_concurrency(1)`.
            /// A `config.destination` other than [`DESTINATION`](Self::DESTINATION)
            /// is an `Error::InvalidConfig`: to read another queue with this
            /// handler, build the consumer with `Consumer::new(inbox, handler, config)`.
            #vis fn consumer_with(
                pool: ::outbox::__private::sqlx::Pool<#db>,
                config: ::outbox::__private::ConsumerConfig,
            ) -> ::core::result::Result<
                ::outbox::__private::Consumer<#db, Self>,
                ::outbox::__private::Error,
            > {
                ::outbox::__private::consumer_for(Self::inbox(pool)?, #name, Self::DESTINATION, config)
            }
        }

        impl ::outbox::__private::Handler<#db> for #name {
            type Event = #event;

            fn decode(
                &self,
                delivery: &::outbox::__private::Delivery,
            ) -> ::core::result::Result<#event, ::std::string::String> {
                #decode
            }

            fn handle<'a>(
                &'a self,
                tx: &'a mut ::outbox::__private::sqlx::Transaction<'static, #db>,
                event: #event,
                delivery: &'a ::outbox::__private::Delivery,
            ) -> ::outbox::__private::BoxFuture<'a, ::core::result::Result<(), ::outbox::__private::HandlerError>> {
                let _ = delivery;
                ::std::boxed::Box::pin(async move {
                    match #function(tx, event #delivery_arg).await {
                        ::core::result::Result::Ok(()) => ::core::result::Result::Ok(()),
                        ::core::result::Result::Err(#error) => ::core::result::Result::Err(#into),
                    }
                })
            }
        }
    }
}

/// `award_points` → `AwardPoints`.
fn upper_camel_case(ident: &Ident) -> String {
    let name = syn::ext::IdentExt::unraw(ident).to_string();
    let mut out = String::with_capacity(name.len());
    for part in name.split('_').filter(|p| !p.is_empty()) {
        let mut chars = part.chars();
        if let Some(first) = chars.next() {
            out.extend(first.to_uppercase());
            out.push_str(chars.as_str());
        }
    }
    if out.is_empty() {
        out.push_str("Handler");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand(attr: TokenStream, item: TokenStream) -> String {
        transactional_event(attr, item).to_string()
    }

    #[test]
    fn struct_names_are_upper_camel_case() {
        let name = |s: &str| upper_camel_case(&syn::parse_str::<Ident>(s).unwrap());
        assert_eq!(name("award_points"), "AwardPoints");
        assert_eq!(name("r#match"), "Match");
        assert_eq!(name("handle_v2_event"), "HandleV2Event");
        assert_eq!(name("_private"), "Private");
    }

    #[test]
    fn a_producer_appends_after_the_body_and_converts_outbox_errors() {
        let out = expand(
            quote!(
                destination = "/queue/a",
                event_type = "a.b",
                table = "My_Outbox"
            ),
            quote! {
                async fn f(tx: &mut Transaction<'_, Sqlite>) -> Result<u8, E> { Ok(1) }
            },
        );
        assert!(out.contains("append_to_table"), "{out}");
        assert!(out.contains("\"my_outbox\""), "{out}");
        assert!(out.contains("into_user_error"), "{out}");
        assert!(!out.contains("compile_error"), "{out}");
        assert!(!out.contains("commit"), "{out}");
    }

    #[test]
    fn versions_are_sent_by_producers_and_read_through_upcasts_by_consumers() {
        let producer = expand(
            quote!(destination = "/queue/a", event_type = "a.b", version = 2),
            quote! {
                async fn f(tx: &mut Transaction<'_, Sqlite>) -> Result<u8, E> { Ok(1) }
            },
        );
        assert!(producer.contains(". with_version (2u32)"), "{producer}");
        let consumer = expand(
            quote!(
                consumer = "c",
                destination = "/queue/a",
                version = 3,
                upcast(v1 = old::V1, v2 = V2)
            ),
            quote! {
                async fn f(tx: &mut Transaction<'_, Sqlite>, e: Ev) -> Result<(), E> { Ok(()) }
            },
        );
        assert!(
            consumer.contains(
                "Versions :: < Ev > :: new (3u32) . upcast :: < old :: V1 > (1u32) . upcast :: < V2 > (2u32) . decode (delivery)"
            ),
            "{consumer}"
        );
        let plain = expand(
            quote!(consumer = "c", destination = "/queue/a"),
            quote! {
                async fn f(tx: &mut Transaction<'_, Sqlite>, e: Ev) -> Result<(), E> { Ok(()) }
            },
        );
        assert!(plain.contains("decode_json :: < Ev >"), "{plain}");
    }

    #[test]
    fn version_mistakes_are_named() {
        let consumer = |attr: TokenStream| {
            expand(
                attr,
                quote! {
                    async fn f(tx: &mut Transaction<'_, Sqlite>, e: Ev) -> Result<(), E> { Ok(()) }
                },
            )
        };
        let cases = [
            (
                consumer(quote!(
                    consumer = "c",
                    destination = "/queue/a",
                    upcast(v1 = V1)
                )),
                "`upcast` needs `version = N`",
            ),
            (
                consumer(quote!(
                    consumer = "c",
                    destination = "/queue/a",
                    version = 2,
                    upcast(v2 = V1)
                )),
                "v2 is not older than `version = 2`",
            ),
            (
                consumer(quote!(
                    consumer = "c",
                    destination = "/queue/a",
                    version = 2,
                    upcast(one = V1)
                )),
                "name each older version `v` and its number",
            ),
            (
                consumer(quote!(
                    consumer = "c",
                    destination = "/queue/a",
                    version = 2,
                    upcast(v1 = V1, v1 = V0)
                )),
                "version 1 is given twice",
            ),
            (
                consumer(quote!(
                    consumer = "c",
                    destination = "/queue/a",
                    version = 0
                )),
                "a whole number literal from 1",
            ),
            (
                consumer(quote!(
                    consumer = "c",
                    destination = "/queue/a",
                    version = "2"
                )),
                "a whole number literal from 1",
            ),
            (
                expand(
                    quote!(
                        destination = "/queue/a",
                        event_type = "a.b",
                        version = 2,
                        upcast(v1 = V1)
                    ),
                    quote! {
                        async fn f(tx: &mut Transaction<'_, Sqlite>) -> Result<u8, E> { Ok(1) }
                    },
                ),
                "`upcast` is a consumer argument",
            ),
        ];
        for (out, expected) in cases {
            assert!(out.contains("compile_error"), "{out}");
            assert!(out.contains(expected), "expected {expected:?} in {out}");
        }
    }

    #[test]
    fn the_pool_form_begins_commits_and_wakes() {
        let out = expand(
            quote!(pool, destination = "/queue/a", event_type = "a.b"),
            quote! {
                async fn f(tx: &mut Transaction<'_, Sqlite>) -> Result<u8, E> { Ok(1) }
            },
        );
        assert!(
            out.contains("pool : & :: outbox :: __private :: sqlx :: Pool < Sqlite >"),
            "{out}"
        );
        assert!(out.contains("begin_write"), "{out}");
        assert!(out.contains(". commit ()"), "{out}");
        assert!(out.contains("wake (\"outbox_event\")"), "{out}");
    }

    #[test]
    fn a_consumer_keeps_the_function_and_adds_a_handler() {
        let item = quote! {
            pub async fn award_points(tx: &mut Transaction<'_, Sqlite>, e: Ev) -> Result<(), E> { Ok(()) }
        };
        let out = expand(
            quote!(consumer = "points", destination = "/queue/p"),
            item.clone(),
        );
        assert!(out.starts_with(&item.to_string()), "{out}");
        assert!(out.contains("pub struct AwardPoints"), "{out}");
        assert!(out.contains("Handler < Sqlite > for AwardPoints"), "{out}");
    }

    #[test]
    fn errors_come_with_the_unchanged_function() {
        let item = quote! {
            fn f(tx: &mut Transaction<'_, Sqlite>) -> Result<u8, E> { Ok(1) }
        };
        let out = expand(quote!(destination = "/queue/a"), item.clone());
        assert!(out.contains("compile_error"), "{out}");
        assert!(out.contains("missing `event_type`"), "{out}");
        assert!(out.contains("needs an `async fn`"), "{out}");
        assert!(out.ends_with(&item.to_string()), "{out}");
    }
}
