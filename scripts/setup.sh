# Shared by scripts/test and scripts/try (sourced, not run): everything a fresh
# Debian/Ubuntu machine needs, installed only when missing, then the test bed up.
# Needs root: the bed runs its own dockerd and sshd.

ib_need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then
      echo "$1: the test bed starts dockerd and sshd, which need root; run: sudo $1" >&2
    else
      echo "$1: the test bed starts dockerd and sshd, which need root; run it as root" \
           "(this machine has no sudo)" >&2
    fi
    exit 1
  fi
}

ib_need_arch() {
  # the test stack has locks for these two (examples/mini: wheels.<arch>.lock)
  case "$(uname -m)" in
    x86_64|amd64|aarch64|arm64) ;;
    *) echo "$1: the test bed and the test stack run on x86_64 and aarch64 hosts, not" \
            "$(uname -m)" >&2
       exit 1 ;;
  esac
}

ib_packages() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v docker >/dev/null || missing+=(docker.io)
  [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
  command -v ssh >/dev/null || missing+=(openssh-client)
  command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
  python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

ib_venv() {
  [ -x .venv/bin/python ] || python3 -m venv .venv
  local stamp=.venv/.imagebuild-installed want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "installing imagebuild into .venv" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
    echo "$want" > "$stamp"
  fi
}

ib_bed_up() {
  # arguments go to 'testbed.py up' (scripts/test passes --fresh in CI)
  .venv/bin/python scripts/testbed.py up "$@" >/dev/null
  # shellcheck disable=SC1091
  . "${IMAGEBUILD_BED:-/var/lib/imagebuild-bed}/env"
}
