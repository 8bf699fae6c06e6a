#!/usr/bin/env bash
# One entry point for the README's quick start and for CI.
#
#   bash scripts/quickstart.sh demo   # install, then train and test on built-in data (uniperception demo)
#   bash scripts/quickstart.sh test   # install with the dev extras, then run the whole test suite
#
# It installs what it needs: the Debian libraries open3d links against (when missing, through apt-get as root or
# with sudo) and the Python packages, into ./.venv unless a virtual environment is already active
# (UNIPERCEPTION_VENV picks another folder). Extra arguments after "test" go to pytest, after "demo" to
# uniperception demo (e.g. --modality all).
set -euo pipefail
cd "$(dirname "$0")/.."

command="${1:-}"
shift || true
case "$command" in
  demo|test) ;;
  *) echo "usage: bash scripts/quickstart.sh demo [uniperception demo options] | test [pytest arguments]" >&2; exit 2 ;;
esac

# --- Debian packages: open3d needs libusb, GL/EGL and X11 client libraries even when nothing is displayed;
#     espeak-ng speaks the built-in spoken-commands dataset; g++ and the Python headers build our CPU
#     depthwise-convolution kernels (only where the Python in use lacks them)
debian_packages=(libusb-1.0-0 libgl1 libegl1 libx11-6 libudev1 libgomp1 espeak-ng)
if command -v dpkg-query >/dev/null 2>&1; then
  missing=()
  for package in "${debian_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  command -v g++ >/dev/null 2>&1 || missing+=(g++)
  python_for_headers="$(command -v python3.11 || command -v python3)"
  if ! "$python_for_headers" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    missing+=("$("$python_for_headers" -c 'import sys; print("python%d.%d-dev" % sys.version_info[:2])')")
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then sudo_cmd=(); elif command -v sudo >/dev/null 2>&1; then sudo_cmd=(sudo); else
      echo "missing Debian packages: ${missing[*]} (install them as root: apt-get install ${missing[*]})" >&2; exit 1
    fi
    echo "installing Debian packages: ${missing[*]}"
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# --- Python environment
if [ -z "${VIRTUAL_ENV:-}" ]; then
  venv="${UNIPERCEPTION_VENV:-.venv}"
  python_bin="$(command -v python3.11 || command -v python3)"
  [ -x "$venv/bin/python" ] || "$python_bin" -m venv "$venv"
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
fi
extras=""
[ "$command" = test ] && extras="[dev]"
log="$(mktemp -t uniperception-install.XXXXXX)"
echo "installing Python packages (log: $log)"
if ! { python -m pip install --disable-pip-version-check --upgrade pip &&
       python -m pip install --disable-pip-version-check -e ".${extras}"; } >"$log" 2>&1; then
  tail -n 40 "$log" >&2
  echo "installing the Python packages failed; the whole log is in $log" >&2
  exit 1
fi

# --- our CPU depthwise-convolution kernels: compiled once per machine (about 30 s) and cached; where they cannot be
#     built the message says why and PyTorch's convolution is used
echo "building the CPU depthwise-convolution kernels"
python -m backbones.ops || true

# --- the job
if [ "$command" = demo ]; then
  exec uniperception demo "$@"
else
  exec python -m pytest "$@"
fi
