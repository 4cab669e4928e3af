#!/usr/bin/env bash
# Builds the Debian package target/debian/stately_<version>_<arch>.deb: the binaries, the
# hardened unit, the default configuration (/etc/stately/stately.toml: the embedded defaults
# with the unix socket for the stately group turned on), shell completions and the man page.
# Needs cargo-deb (installed when missing). Extra arguments go to cargo-deb (the tests use
# `--profile dev --no-build` to package the binaries they built; `--deb-version` too).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo deb --version >/dev/null 2>&1 || cargo install cargo-deb --locked --version '^3.8' --quiet

profile=release
build=1
pass=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --no-build) build=0; continue ;;
    --profile) profile="${args[i + 1]:-release}" ;;
    --profile=*) profile="${args[i]#--profile=}" ;;
  esac
  pass+=("${args[i]}")
done
[ "$profile" = dev ] && dir=debug || dir="$profile"
if [ "$build" = 1 ]; then
  cargo build --profile "$profile" --bin statelyd --bin stately
fi
bin="target/$dir"

out=target/package
mkdir -p "$out"
"$bin/statelyd" --print-config \
  | sed -e 's|^# listen_unix = "/run/stately/stately.sock"$|listen_unix = "/run/stately/stately.sock"|' \
        -e 's|^# listen_unix_group = "stately"$|listen_unix_group = "stately"|' \
  > "$out/stately.toml"
cat >> "$out/stately.toml" <<'TOML'

# Members of the stately group (adduser alice stately) run jobs through the unix socket:
#   stately --server unix:/run/stately/stately.sock jobs list
[[unix_peer]]
group = "stately"
role = "operator"
TOML
grep -q '^listen_unix = ' "$out/stately.toml" && grep -q '^listen_unix_group = ' "$out/stately.toml" \
  || { echo "package.sh: the default config no longer has the listen_unix lines to turn on" >&2; exit 1; }
"$bin/stately" completions bash > "$out/stately.bash"
"$bin/stately" completions zsh > "$out/_stately"
"$bin/stately" completions fish > "$out/stately.fish"
"$bin/stately" man | gzip -9n > "$out/stately.1.gz"

cargo deb --no-build "${pass[@]}"
