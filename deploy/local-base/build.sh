#!/usr/bin/env bash
# Make the PyTorch base image without an image registry: a Debian 12 root filesystem with python3 and
# python3-venv from this machine's own apt sources (mmdebstrap), imported as an image, then torch and
# torchvision from PyPI (Dockerfile here). Prints the base's tag on the last line of stdout, for
#   docker build -f deploy/Dockerfile --build-arg PYTORCH_IMAGE=<that tag> ...
#
# Needs root (mmdebstrap), mmdebstrap, and a running Docker engine; deploy/smoke.sh sees to all three.
# Both images are made once and then reused: the Debian one is tagged by a hash of what makes it (this
# script's package list and the apt sources), the PyTorch one comes from Docker's layer cache.
set -euo pipefail

DOCKER=${DOCKER:-/usr/bin/docker}  # Debian's CLI; another `docker` earlier on PATH may not talk to this engine
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates,passwd  # passwd: useradd/groupadd for the image's user
CA_DIR=${CA_DIR:-/usr/local/share/ca-certificates}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The machine's apt sources, as apt reads them (a .list or .sources file, not the disabled ones).
sources=()
for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    if [[ -f $file ]] && grep -qE '^[[:space:]]*[^#[:space:]]' "$file"; then
        sources+=("$file")
    fi
done
if ((${#sources[@]} == 0)) || ! grep -qs "$SUITE" "${sources[@]}"; then
    echo "build.sh: no apt source for Debian 12 ($SUITE) in /etc/apt: the base needs one" >&2
    exit 2
fi

recipe=$(printf '%s\n' "mmdebstrap --variant=minbase --include=$PACKAGES $SUITE" && cat "${sources[@]}")
debian_image=yolo-batch-debian:12-$(printf '%s' "$recipe" | sha256sum | cut -c1-12)
if ! "$DOCKER" image inspect "$debian_image" >/dev/null 2>&1; then
    echo "build.sh: making $debian_image with mmdebstrap from ${sources[*]}" >&2
    mmdebstrap --quiet --variant=minbase --include="$PACKAGES" "$SUITE" "$work/rootfs.tar" "${sources[@]}"
    "$DOCKER" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
        --message "Debian 12 minbase + $PACKAGES (mmdebstrap)" "$work/rootfs.tar" "$debian_image" >/dev/null
    rm -f "$work/rootfs.tar"
fi

torch_version=$(sed -n 's/^torch==//p' "$HERE/torch-constraints.txt")
pytorch_image=yolo-batch-pytorch:$torch_version
mkdir "$work/context" "$work/context/certs"
cp "$HERE/Dockerfile" "$HERE/torch-constraints.txt" "$work/context/"
# Only the .crt files: update-ca-certificates reads nothing else, and the context stays free of other files.
find "$CA_DIR" -maxdepth 1 -name '*.crt' -type f -exec cp {} "$work/context/certs/" \; 2>/dev/null || true
"$DOCKER" build --build-arg DEBIAN_IMAGE="$debian_image" -t "$pytorch_image" "$work/context" >&2
echo "$pytorch_image"
