# Sourced by the GPU machine's scripts: the device bundles' environment, and the repo's folders as the package
# specattn without installing anything (run from the repo root).
source /opt/specattn-dev/env.sh
export SPECATTN_CACHE_DIR=/tmp/specattn-cache
mkdir -p /tmp/pkg/specattn
for d in engine kernels server loadtest; do ln -sfn "$PWD/$d" "/tmp/pkg/specattn/$d"; done
export PYTHONPATH=/tmp/pkg:$PWD:$PYTHONPATH
