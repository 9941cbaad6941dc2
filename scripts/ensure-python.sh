#!/usr/bin/env bash
# Makes sure python3 with venv is installed (the reader tests make their own virtualenv with
# deltalake, pyarrow and psycopg from PyPI). Sourced by the other scripts. Installs Debian's
# packages when they are missing.
if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  echo "python3 with venv not found: installing Debian's python3-venv" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq python3 python3-venv >/dev/null
fi
