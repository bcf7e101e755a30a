#!/usr/bin/env bash
# The declared minimum Rust version (`rust-version` in Cargo.toml) against the
# dependencies in the lock: fails if any of them declares a newer one. The
# standard library APIs the workspace uses are checked against it by clippy
# (`incompatible_msrv`, which reads `rust-version`). Building and testing on
# that exact toolchain needs `rustup toolchain install <version>`; where the
# machine can fetch toolchains, `scripts/msrv.sh --build` does that too.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { printf '[msrv] %s\n' "$*"; }

cargo metadata --format-version 1 --locked | python3 -c '
import json, sys
meta = json.load(sys.stdin)
ours = {p["name"]: p for p in meta["packages"] if p["source"] is None}
def version(text):
    parts = [int(x) for x in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))
declared = {version(p["rust_version"]) for p in ours.values() if p.get("rust_version")}
if len(declared) != 1:
    sys.exit(f"[msrv] the workspace packages declare {len(declared)} different rust-versions")
msrv = declared.pop()
newer = sorted(
    (p["name"], p["version"], p["rust_version"])
    for p in meta["packages"]
    if p["source"] is not None and p.get("rust_version") and version(p["rust_version"]) > msrv
)
shown = ".".join(map(str, msrv))
for name, ver, needs in newer:
    print(f"[msrv] {name} {ver} needs Rust {needs}, above the declared {shown}")
if newer:
    sys.exit(1)
print(f"[msrv] every locked dependency builds on the declared Rust {shown}")
'

if [ "${1:-}" = "--build" ]; then
  msrv=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["packages"][0]["rust_version"])')
  say "rustup toolchain install $msrv --profile minimal"
  rustup toolchain install "$msrv" --profile minimal
  say "cargo +$msrv test --workspace --all-features --no-run"
  cargo "+$msrv" test --workspace --all-features --no-run
fi
