#!/usr/bin/env bash
# Makes sure Node.js and npm are installed (the Azure Blob tests install Azurite from npm into the
# build directory). Sourced by the other scripts. Installs Debian's packages when they are missing.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "node/npm not found: installing Debian's nodejs and npm" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi
