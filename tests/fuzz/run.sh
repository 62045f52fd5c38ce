#!/usr/bin/env bash
# make fuzz: builds the libFuzzer harnesses (clang, ASan + UBSan) and runs each
# for FUZZ_SECONDS (default 60) on its corpus; new inputs that grow coverage are
# kept in a scratch copy, crashes land in tests/fuzz/crashes/.
#   bash tests/fuzz/run.sh            fuzz each target for FUZZ_SECONDS
#   bash tests/fuzz/run.sh --replay   only run the committed corpus (regressions); used by make test
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=${1:-fuzz}
seconds=${FUZZ_SECONDS:-60}
inc=$(/usr/lib/postgresql/15/bin/pg_config --includedir-server)
lib=$(/usr/lib/postgresql/15/bin/pg_config --pkglibdir)
out=tests/fuzz/bin
mkdir -p "$out" tests/fuzz/crashes
flags=(-g -O1 -Wno-ignored-attributes -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Iextension -I"$inc")

clang "${flags[@]}" -o "$out/fuzz_codec" tests/fuzz/fuzz_codec.c extension/codec.c
clang "${flags[@]}" -DFRONTEND -o "$out/fuzz_json" tests/fuzz/fuzz_json.c extension/json.c extension/codec.c \
  "$lib/libpgcommon.a" "$lib/libpgport.a"

status=0
for target in codec json; do
  corpus=tests/fuzz/corpus/$target
  opts=(-max_len=65536 -artifact_prefix=tests/fuzz/crashes/"$target"-)
  if [ "$mode" = --replay ]; then
    echo "fuzz: replaying $(ls "$corpus" | wc -l) inputs for $target"
    ASAN_OPTIONS=detect_leaks=0 "$out/fuzz_$target" "${opts[@]}" -runs=0 "$corpus" >/dev/null 2>"$out/$target.log" ||
      { status=1; tail -30 "$out/$target.log"; }
  else
    work=$(mktemp -d)
    echo "fuzz: $target for ${seconds}s"
    "$out/fuzz_$target" "${opts[@]}" -max_total_time="$seconds" -print_final_stats=1 "$work" "$corpus" \
      2>"$out/$target.log" || status=1
    grep -E "^stat::number_of_executed_units|^stat::peak_rss_mb|^#[0-9]+.*DONE|ERROR|SUMMARY" "$out/$target.log" | tail -5 || true
    rm -rf "$work"
  fi
done
exit $status
