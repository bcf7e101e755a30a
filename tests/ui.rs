//! Compile-time behaviour of `#[transactional_event]`: what compiles
//! (`tests/ui/pass`) and the error each mistake gives (`tests/ui/fail`, with the
//! expected compiler output beside each case). Regenerate the `.stderr` files
//! with `TRYBUILD=overwrite cargo test --test ui` and read them before committing.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
