# shellcheck shell=bash
# Stand-in of nixpkgs' pytestCheckHook (tests only): how it turns a derivation's
# attributes into pytest's argv, line for line as nixpkgs does it in
# pkgs/development/interpreters/python/hooks/pytest-check-hook.sh (NixOS/nixpkgs, the
# version with enabledTestMarks/disabledTestMarks and pytestFlags, 2025; 25.11 era),
# with stdenv's concatTo/concatStringsSep (pkgs/stdenv/generic/setup.sh) in setup-lib.sh.
# The path-glob checks run no Python here (the glob is tested with bash's own), and
# @pythonCheckInterpreter@ is whatever the caller puts in pythonCheckInterpreter.

function _pytestIncludeExcludeExpr() {
    local includeListName="$1"
    local -n includeListRef="$includeListName"
    local excludeListName="$2"
    local -n excludeListRef="$excludeListName"
    local includeString excludeString
    if [[ -n "${includeListRef[*]-}" ]]; then
        # ((element1) or (element2))
        includeString="(($(concatStringsSep ") or (" "$includeListName")))"
    fi
    if [[ -n "${excludeListRef[*]-}" ]]; then
        # and not (element1) and not (element2)
        excludeString="${includeString:+ and }not ($(concatStringsSep ") and not (" "$excludeListName"))"
    fi
    echo "$includeString$excludeString"
}

function pytestCheckPhase() {
    runHook preCheck

    local -a flagsArray=(-m pytest)

    local -a _pathsArray
    local path

    _pathsArray=()
    concatTo _pathsArray enabledTestPaths
    for path in "${_pathsArray[@]}"; do
        if [[ "$path" =~ "::" ]]; then
            flagsArray+=("$path")
        else
            local -a _expanded=()
            # shellcheck disable=SC2206
            _expanded=($path)
            [[ -e "${_expanded[0]-}" ]] || { echo "Enabled tests path glob \"$path\" does not match any paths. Aborting" >&2; return 1; }
            flagsArray+=("${_expanded[@]}")
        fi
    done

    _pathsArray=()
    concatTo _pathsArray disabledTestPaths
    for path in "${_pathsArray[@]}"; do
        if [[ "$path" =~ "::" ]]; then
            flagsArray+=("--deselect=$path")
        else
            flagsArray+=("--ignore-glob=$path")
        fi
    done

    if [[ -n "${enabledTests[*]-}" ]] || [[ -n "${disabledTests[*]-}" ]]; then
        flagsArray+=(-k "$(_pytestIncludeExcludeExpr enabledTests disabledTests)")
    fi

    if [[ -n "${enabledTestMarks[*]-}" ]] || [[ -n "${disabledTestMarks[*]-}" ]]; then
        flagsArray+=(-m "$(_pytestIncludeExcludeExpr enabledTestMarks disabledTestMarks)")
    fi

    # Compatibility layer to the obsolete pytestFlagsArray
    eval "flagsArray+=(${pytestFlagsArray[*]-})"

    concatTo flagsArray pytestFlags
    "$pythonCheckInterpreter" "${flagsArray[@]}"

    runHook postCheck
}
