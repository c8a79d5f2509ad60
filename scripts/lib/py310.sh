# shellcheck shell=bash
# find_py310: print the path of a working Python 3.10 (JetPack 6's): python3.10 on PATH, else one
# under `pyenv root`; print nothing when there is none.
find_py310() {
  local candidate
  for candidate in python3.10 "$(pyenv root 2> /dev/null || echo /nonexistent)"/versions/3.10*/bin/python3.10; do
    if "$candidate" -c "" 2> /dev/null; then
      echo "$candidate"
      return
    fi
  done
}
