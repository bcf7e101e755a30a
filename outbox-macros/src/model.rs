//! The typed model of one annotated function. It keeps the original syn nodes
//! so that errors and generated code point at the user's own tokens.

use proc_macro2::Span;
use proc_macro2::TokenStream;
use quote::ToTokens;
use syn::{Expr, ExprPath, Ident, ItemFn, LitStr, Pat, Type};

/// An argument's value together with the name it was given under.
pub(crate) struct Named<T> {
    /// The argument's name as written (for spans).
    pub(crate) name: Ident,
    /// Its value.
    pub(crate) value: T,
}

/// The arguments, each at most once, with the right kind of value.
#[derive(Default)]
pub(crate) struct Args {
    pub(crate) pool: Option<Ident>,
    pub(crate) destination: Option<Named<Destination>>,
    pub(crate) event_type: Option<Named<LitStr>>,
    pub(crate) key: Option<Named<Expr>>,
    pub(crate) headers: Option<Named<Vec<Header>>>,
    pub(crate) table: Option<Named<LitStr>>,
    pub(crate) consumer: Option<Named<LitStr>>,
    pub(crate) version: Option<Named<u32>>,
    pub(crate) upcast: Option<Named<Vec<Upcast>>>,
}

/// An older version a consumer reads: `v1 = UserCreatedV1` in `upcast(…)`.
pub(crate) struct Upcast {
    /// The version number, from the pair's name (`v1`).
    pub(crate) version: u32,
    /// The type its payloads decode as, converted with `From` into the event.
    pub(crate) ty: ExprPath,
}

/// Where a producer's events go, or the queue a consumer reads.
pub(crate) enum Destination {
    /// A string literal, checked when the macro expands.
    Literal(LitStr),
    /// The path of a `const &str`, checked when the constant is evaluated
    /// (a `const _` the expansion adds).
    Const(ExprPath),
}

impl Destination {
    /// How the destination reads in generated docs.
    pub(crate) fn describe(&self) -> String {
        match self {
            Destination::Literal(lit) => format!("`{:?}`", lit.value()),
            Destination::Const(path) => {
                let path = path.to_token_stream().to_string().replace(' ', "");
                format!("the value of `{path}`")
            }
        }
    }
}

impl ToTokens for Destination {
    fn to_tokens(&self, tokens: &mut TokenStream) {
        match self {
            Destination::Literal(lit) => lit.to_tokens(tokens),
            Destination::Const(path) => path.to_tokens(tokens),
        }
    }
}

/// One extra header of a producer's events.
pub(crate) struct Header {
    /// The header name.
    pub(crate) name: LitStr,
    /// Its value: an expression over `event` whose result implements `Display`.
    pub(crate) value: Expr,
}

/// What the attribute turns the function into.
pub(crate) enum Form {
    Producer(Box<Producer>),
    Consumer(Box<Consumer>),
}

/// `#[transactional_event(destination = …, event_type = …)]`, with or without `pool`.
pub(crate) struct Producer {
    pub(crate) func: ItemFn,
    /// The transaction parameter as written.
    pub(crate) tx: TxParam,
    /// `Some` in the pool form: the generated function takes `pool: &Pool<DB>`.
    pub(crate) pool: Option<Ident>,
    pub(crate) destination: Destination,
    pub(crate) event_type: LitStr,
    pub(crate) key: Option<Expr>,
    pub(crate) headers: Vec<Header>,
    /// `version = N`: sent as the `event-version` header.
    pub(crate) version: Option<u32>,
    /// The outbox table as the relay names it (lower case).
    pub(crate) table: LitStr,
    /// The whole return type, `Result<…>`.
    pub(crate) output: Type,
    /// The error type of the `Result` (for the span of the conversion).
    pub(crate) error_span: Span,
    /// Whether the `Ok` value is one event or several.
    pub(crate) events: Events,
    /// The event type as written in the return type (for the span of the
    /// `Serialize` requirement).
    pub(crate) event_span: Span,
}

/// The `Ok` value of a producer.
pub(crate) enum Events {
    /// One event: the value itself is serialised.
    One,
    /// `Vec<E>` or `Option<E>`: each element is one event.
    Each,
}

/// `#[transactional_event(consumer = …, destination = …)]`.
pub(crate) struct Consumer {
    pub(crate) func: ItemFn,
    /// The database type `DB` of `&mut Transaction<'_, DB>`.
    pub(crate) db: Type,
    /// The event parameter's type.
    pub(crate) event: Type,
    /// Whether the function takes `delivery: &Delivery` as third parameter.
    pub(crate) delivery: bool,
    /// The error type of the function's `Result` (for the span of the conversion).
    pub(crate) error_span: Span,
    pub(crate) consumer: LitStr,
    pub(crate) destination: Destination,
    /// The inbox table, if not the default.
    pub(crate) table: Option<LitStr>,
    /// `version = N` and its `upcast(…)`: the versions read and how.
    pub(crate) versions: Option<(u32, Vec<Upcast>)>,
}

/// The first parameter, `tx: &mut Transaction<'_, DB>`.
pub(crate) struct TxParam {
    /// The parameter's pattern as written, e.g. `tx` or `mut tx`.
    pub(crate) pat: Pat,
    /// Its type as written.
    pub(crate) ty: Type,
    /// `DB`.
    pub(crate) db: Type,
}
