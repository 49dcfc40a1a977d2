# Sourced by demo.sh and test.sh: sets PY, the Python that liverseg is installed into and
# run with. $PYTHON if given; else the active virtual environment's; else the project's
# .venv/ if there is one; else python3 — unless that is a system Python that pip refuses
# to install into (externally managed, as on Debian and Ubuntu): then .venv/ is made.
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
  elif "$PY" -c 'import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if managed and sys.prefix == sys.base_prefix else 1)' 2>/dev/null; then
    echo "==> $("$PY" -c 'import sys; print(sys.executable)') is managed by the system (pip may not install into it):" \
         "making the project environment .venv/ (used from now on)"
    "$PY" -m venv .venv || { echo "Error: cannot make .venv/ (on Debian/Ubuntu: apt install python3-venv)" >&2; exit 1; }
    PY=.venv/bin/python
  fi
fi
