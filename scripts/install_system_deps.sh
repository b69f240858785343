#!/usr/bin/env bash
# The system (Debian) packages behind AION-Train's optional features, for `make install`.
#
#   scripts/install_system_deps.sh           install what is missing (root or passwordless sudo),
#                                            else say what is missing and what needs it
#   scripts/install_system_deps.sh --check   only say what is missing (never installs)
#
# Always exits 0 when only these optional packages are missing: training, the text demo and every
# Python-only feature need none of them, and the tests that do skip with a reason naming the
# package. It exits 1 only for the one thing the Python install itself needs: python3-venv when
# VENV_PYTHON names an interpreter that must create the venv and cannot.
# Only runs `apt-get update` when something is missing.
set -uo pipefail

CHECK_ONLY=0
case "${1:-}" in
    --check) CHECK_ONLY=1 ;;
    "") ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

# Debian package | a program it provides (how "installed" is detected) | what needs it
PACKAGES=(
    "espeak-ng|espeak-ng|the multimodal demo's speech clips (aion-train make-shards --modality multimodal|all, configs/tiny_multimodal_cpu.yaml) and the tests that build them"
    "sox|sox|resampling those speech clips to 16 kHz (numpy resamples them without it)"
    "chromium|chromium|the browser tests of the MLflow UI and the admin dashboard (tests/test_mlflow_server.py, tests/test_admin_browser.py)"
    "chromium-driver|chromedriver|driving that browser from Selenium (chromedriver; tests/test_admin_browser.py)"
    "slurmctld|slurmctld|the one-node Slurm cluster of the sbatch tests (tests/test_slurm.py, slurm/local_cluster.sh)"
    "slurmd|slurmd|the same Slurm cluster (its compute-node daemon)"
    "slurm-client|sbatch|sbatch/srun of the sbatch tests and slurm/pretrain.sh"
    "munge|munged|the same Slurm cluster (its authentication daemon)"
)

have_program() {   # daemons live in /usr/sbin, which is not on a normal user's PATH
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]
}

MISSING=()        # package names
declare -A WHY=()
for row in "${PACKAGES[@]}"; do
    IFS='|' read -r pkg prog why <<<"$row"
    if ! have_program "$prog"; then
        MISSING+=("$pkg")
        WHY[$pkg]="$why"
    fi
done

# A venv from an "externally managed" (PEP 668) interpreter needs ensurepip: Debian's python3-venv.
NEED_VENV_PKG=0
if [ -n "${VENV_PYTHON:-}" ] && ! "$VENV_PYTHON" -c "import ensurepip, venv" >/dev/null 2>&1; then
    NEED_VENV_PKG=1
    MISSING+=("python3-venv")
    WHY[python3-venv]="creating .venv with $VENV_PYTHON (its pip may not install outside a venv: PEP 668)"
fi

[ ${#MISSING[@]} -eq 0 ] && exit 0

report() {   # $1: headline
    echo "$1" >&2
    for pkg in "${MISSING[@]}"; do
        printf '  %-16s for %s\n' "$pkg" "${WHY[$pkg]}" >&2
    done
}

SUDO=""
CAN_INSTALL=0
if [ "$CHECK_ONLY" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        CAN_INSTALL=1
    elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
        SUDO="sudo -n"
        CAN_INSTALL=1
    fi
fi

finish_without() {   # $1: why they were not installed
    report "install_system_deps: these system packages are missing ($1):"
    echo "  Python-only features (training, the text demo) do not need them; the tests that do are" >&2
    echo "  skipped with a reason naming the package. To add them: sudo apt-get install --no-install-recommends ${MISSING[*]}" >&2
    if [ "$NEED_VENV_PKG" = 1 ]; then
        echo "install_system_deps: python3-venv is required to create .venv with $VENV_PYTHON" \
             "(or run make inside a venv you made yourself, or pass PYTHON=<a Python whose pip may install>)" >&2
        exit 1
    fi
    exit 0
}

if [ "$CHECK_ONLY" = 1 ]; then
    finish_without "checked only"
fi
if [ "$CAN_INSTALL" = 0 ]; then
    if command -v apt-get >/dev/null 2>&1; then
        finish_without "not root and no passwordless sudo"
    else
        finish_without "no apt-get here: install them with this system's package manager"
    fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "install_system_deps: apt-get install ${MISSING[*]}" >&2
$SUDO apt-get update -qq || echo "install_system_deps: apt-get update failed; trying the cached lists" >&2
AVAILABLE=()
UNAVAILABLE=()
for pkg in "${MISSING[@]}"; do
    # a real package with a candidate version (not just a virtual name)
    policy=$(apt-cache policy "$pkg" 2>/dev/null)   # (not piped into grep -q: SIGPIPE + pipefail)
    if grep -q 'Candidate: [^(]' <<<"$policy"; then
        AVAILABLE+=("$pkg")
    else
        UNAVAILABLE+=("$pkg")
    fi
done
if [ ${#AVAILABLE[@]} -gt 0 ]; then
    if ! $SUDO apt-get install -y -qq --no-install-recommends "${AVAILABLE[@]}" >/dev/null; then
        echo "install_system_deps: apt-get install failed" >&2
    fi
fi

# what is still missing after the install (unavailable here, or a failed install)
STILL=()
for pkg in "${MISSING[@]}"; do
    if [ "$pkg" = python3-venv ]; then
        "$VENV_PYTHON" -c "import ensurepip, venv" >/dev/null 2>&1 || STILL+=("$pkg")
        continue
    fi
    for row in "${PACKAGES[@]}"; do
        IFS='|' read -r p prog _ <<<"$row"
        if [ "$p" = "$pkg" ] && ! have_program "$prog"; then
            STILL+=("$pkg")
        fi
    done
done
if [ ${#STILL[@]} -gt 0 ]; then
    MISSING=("${STILL[@]}")
    NEED_VENV_PKG=0
    for pkg in "${STILL[@]}"; do [ "$pkg" = python3-venv ] && NEED_VENV_PKG=1; done
    finish_without "not installable from this machine's apt sources"
fi
echo "install_system_deps: installed ${MISSING[*]}" >&2
exit 0
