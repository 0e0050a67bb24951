#!/usr/bin/env bash
# Builds kube-apiserver 1.20 offline from Debian's `kubernetes` source package into $1 (default
# .kube/bin), for tests/test_helm_apiserver.py; ~16 min on 2 idle cores. Needs root for apt-get
# (deb-src for bookworm main is added if missing) and Debian's golang-1.19-go, etcd-server and
# golang-github-modern-go-reflect2-dev. The vendored reflect2 1.0.1 crashes on the first custom-
# resource decode with Go >= 1.18: Debian's 1.0.2 replaces it.
set -euo pipefail
dest=$(realpath -m "${1:-.kube/bin}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! apt-get source --print-uris kubernetes >/dev/null 2>&1; then
  printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    > /etc/apt/sources.list.d/debian-src-bookworm.sources
  apt-get update -qq
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-1.19-go etcd-server \
  golang-github-modern-go-reflect2-dev dpkg-dev rsync >/dev/null

cd "$work"
apt-get source -qq --download-only kubernetes
dpkg-source -x --skip-patches kubernetes_*.dsc src >/dev/null
cd src
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
rm -f vendor/github.com/modern-go/reflect2/go.mod
PATH=/usr/lib/go-1.19/bin:$PATH GOFLAGS=-mod=vendor make WHAT=cmd/kube-apiserver
mkdir -p "$dest"
cp _output/bin/kube-apiserver "$dest/"
echo "built $dest/kube-apiserver"
