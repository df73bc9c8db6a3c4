#!/bin/sh
# Installs Fashion-MNIST where avalon_zoo.datasets.fashion_mnist() looks for it.
#
# - Nothing to do (exit 0) when the four files are already in $AVALON_DATA,
#   $AVALON_DATA/fashion-mnist or the Debian location.
# - As root with apt-get: `apt-get update` once, then
#   `apt-get install -y dataset-fashion-mnist` (files go to the Debian location).
# - Otherwise, or if apt-get fails: prints how to get the data and exits 0, so a
#   setup script calling this never fails because of it.
#
# FASHION_MNIST_SYSTEM_DIR overrides the Debian location checked (for tests).
set -u

SYSTEM_DIR="${FASHION_MNIST_SYSTEM_DIR:-/usr/share/datasets/fashion-mnist}"
PACKAGE=dataset-fashion-mnist
FILES="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"

has_all_files() {
    for name in $FILES; do
        [ -f "$1/$name.gz" ] || [ -f "$1/$name" ] || return 1
    done
    return 0
}

installed_in() {
    if [ -n "${AVALON_DATA:-}" ]; then
        for dir in "$AVALON_DATA" "$AVALON_DATA/fashion-mnist"; do
            has_all_files "$dir" && { echo "$dir"; return 0; }
        done
    fi
    has_all_files "$SYSTEM_DIR" && { echo "$SYSTEM_DIR"; return 0; }
    return 1
}

print_instructions() {
    cat <<EOF
Fashion-MNIST is not installed, and this script could not install it ($1).
To get it, either
  - on Debian/Ubuntu: sudo apt-get install $PACKAGE   (installs to $SYSTEM_DIR), or
  - download the four files ($FILES, each .gz)
    from https://github.com/zalandoresearch/fashion-mnist into a directory
    and set AVALON_DATA to that directory (or to its parent, naming it fashion-mnist).
EOF
}

if dir=$(installed_in); then
    echo "Fashion-MNIST is already installed in $dir; nothing to do."
    exit 0
fi

if [ "$(id -u 2>/dev/null)" != "0" ]; then
    print_instructions "not running as root"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    print_instructions "apt-get is not available"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
echo "Installing $PACKAGE with apt-get..."
if apt-get update && apt-get install -y --no-install-recommends "$PACKAGE"; then
    if dir=$(installed_in); then
        echo "Fashion-MNIST installed in $dir."
        exit 0
    fi
    print_instructions "apt-get installed $PACKAGE but the files are not in $SYSTEM_DIR"
    exit 0
fi
print_instructions "apt-get failed"
exit 0
