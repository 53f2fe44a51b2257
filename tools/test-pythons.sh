#!/usr/bin/env bash
# Run the test suite once per supported Python, each in its own virtual environment
# (.venv-3.11, .venv-3.12, .venv-3.13).
#   tools/test-pythons.sh             every supported version
#   tools/test-pythons.sh 3.12 3.13   only these
# An interpreter is looked for as pythonX.Y on PATH, then under ~/.pyenv/versions/*/bin, and
# used only if it runs and reports that version (a pyenv shim for an inactive version does not).
# SKIP="3.11" names versions tested already (CI's `make test` ran on one): each is still looked
# for and reported, but not run again.
# Exit status: 0 every version found passed; 1 a version failed; 3 a version was not found
# (a version that cannot be found is reported, never passed silently).
set -uo pipefail
cd "$(dirname "$0")/.."

SUPPORTED=(3.11 3.12 3.13)
versions=("$@")
[[ ${#versions[@]} -gt 0 ]] || versions=("${SUPPORTED[@]}")

# Print the path of a working interpreter for version $1, or nothing.
find_python() {
  local version=$1 candidate
  local candidates=()
  candidate=$(command -v "python$version" 2>/dev/null) && candidates+=("$candidate")
  for candidate in "$HOME"/.pyenv/versions/"$version".*/bin/python"$version"; do
    [[ -x $candidate ]] && candidates+=("$candidate")
  done
  for candidate in "${candidates[@]}"; do
    if [[ $("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) == "$version" ]]; then
      echo "$candidate"
      return
    fi
  done
}

found=() missing=() paths=()
for version in "${versions[@]}"; do
  path=$(find_python "$version")
  if [[ -n $path ]]; then
    found+=("$version") paths+=("$path")
  else
    missing+=("$version")
  fi
done
echo "test-pythons: found ${found[*]:-none}; not found: ${missing[*]:-none}."

failed=()
for i in "${!found[@]}"; do
  version=${found[$i]}
  if [[ " ${SKIP:-} " == *" $version "* ]]; then
    echo "test-pythons: Python $version skipped: already tested (SKIP=$SKIP)."
    continue
  fi
  echo "test-pythons: Python $version (${paths[$i]}) in .venv-$version"
  if ! make --no-print-directory pytest PYTHON="${paths[$i]}" VENV=".venv-$version"; then
    failed+=("$version")
  fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "test-pythons: FAILED on ${failed[*]}; passed on the others found." >&2
  exit 1
fi
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "test-pythons: passed on ${found[*]:-none}, but ${missing[*]} could not be found." >&2
  exit 3
fi
echo "test-pythons: passed on ${found[*]}."
