#!/usr/bin/env bash
# Create an isolated venv with llm-compressor for baseline comparisons
# (benchmarks/llmcompressor_baseline.py). Idempotent: re-running is a no-op
# once the pinned versions are installed.
#
# Why the pins:
#   * The venv uses --system-site-packages so it reuses the system CPU torch
#     (2.13.0+cpu) instead of letting pip pull a multi-GB CUDA build.
#     torch is additionally pinned to the system version so pip can never
#     "upgrade" it.
#   * llmcompressor 0.14.0.1 (newest at time of writing) requires
#     transformers>=5.15,<=5.17 and compressed-tensors==0.19.0, while the system
#     has transformers 5.23.0 / compressed-tensors 0.20.0. Those pins are
#     installed INSIDE the venv only (they shadow the system copies there);
#     the system site-packages are never modified.
#
# Overrides (env vars): PYTHON, VENV_DIR, LLMC_VERSION, LLMC_TRANSFORMERS,
# LLMC_COMPRESSED_TENSORS, TORCH_VERSION.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
VENV_DIR="${VENV_DIR:-$HERE/.venv-llmcompressor}"
LLMC_VERSION="${LLMC_VERSION:-0.14.0.1}"
LLMC_TRANSFORMERS="${LLMC_TRANSFORMERS:-5.17.0}"
LLMC_COMPRESSED_TENSORS="${LLMC_COMPRESSED_TENSORS:-0.19.0}"

# Reuse whatever torch the system interpreter has (a CPU build here).
SYS_TORCH="$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
if [[ -z "${TORCH_VERSION:-}" ]]; then
    if [[ -n "$SYS_TORCH" ]]; then
        TORCH_VERSION="${SYS_TORCH%%+*}"   # 2.13.0+cpu -> 2.13.0
    else
        TORCH_VERSION="2.13.0"
    fi
fi

VPY="$VENV_DIR/bin/python"

print_versions() {
    "$VPY" - <<'EOF'
import importlib.metadata as md
import torch
for pkg in ("llmcompressor", "compressed-tensors", "transformers", "torch",
            "accelerate", "datasets", "auto-round"):
    try:
        v = md.version(pkg)
    except md.PackageNotFoundError:
        v = "not installed"
    print(f"  {pkg:20s} {v}")
print(f"  torch.cuda available  {torch.cuda.is_available()} (torch {torch.__version__})")
EOF
}

is_installed() {
    [[ -x "$VPY" ]] || return 1
    "$VPY" - "$LLMC_VERSION" "$LLMC_TRANSFORMERS" "$LLMC_COMPRESSED_TENSORS" <<'EOF' 2>/dev/null
import sys, importlib.metadata as md
want = dict(zip(("llmcompressor", "transformers", "compressed-tensors"), sys.argv[1:4]))
for pkg, v in want.items():
    if md.version(pkg) != v:
        sys.exit(1)
import llmcompressor  # noqa: F401  (import must work too)
EOF
}

if is_installed; then
    echo "[setup_llmcompressor] already installed in $VENV_DIR"
    print_versions
    exit 0
fi

if [[ ! -x "$VPY" ]]; then
    echo "[setup_llmcompressor] creating venv $VENV_DIR (--system-site-packages)"
    "$PYTHON" -m venv --system-site-packages "$VENV_DIR"
fi

echo "[setup_llmcompressor] installing llmcompressor==$LLMC_VERSION" \
     "transformers==$LLMC_TRANSFORMERS compressed-tensors==$LLMC_COMPRESSED_TENSORS" \
     "(torch pinned to $TORCH_VERSION)"
# The torch pin is satisfied by the system CPU build (local label +cpu is
# ignored by '=='), so pip installs no torch. --upgrade-strategy only-if-needed
# keeps every other already-satisfied system package untouched.
"$VPY" -m pip install --disable-pip-version-check --upgrade-strategy only-if-needed \
    "llmcompressor==$LLMC_VERSION" \
    "transformers==$LLMC_TRANSFORMERS" \
    "compressed-tensors==$LLMC_COMPRESSED_TENSORS" \
    "torch==$TORCH_VERSION"

# Guard: torch must still be the system build (no CUDA wheel in the venv).
if compgen -G "$VENV_DIR/lib/python*/site-packages/torch" > /dev/null; then
    echo "[setup_llmcompressor] WARNING: a torch copy was installed inside the venv" >&2
fi

is_installed || { echo "[setup_llmcompressor] install check failed" >&2; exit 1; }
echo "[setup_llmcompressor] done: $VENV_DIR"
print_versions
