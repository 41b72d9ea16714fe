# shellcheck shell=bash
# stdenv's list helpers as nixpkgs' pkgs/stdenv/generic/setup.sh defines them (tests
# only): concatTo concatenates arrays and splits strings on whitespace; concatStringsSep
# joins an array's elements, or a string's space-separated words, with a separator.
# Without __structuredAttrs a derivation's list attribute reaches the builder as one
# string, its elements joined by spaces: an element with a space in it is split again.

concatTo() {
    local -
    set -o noglob
    local -n targetref="$1"; shift
    local arg default name type
    for arg in "$@"; do
        IFS="=" read -r name default <<< "$arg"
        local -n nameref="$name"
        if [[ -z "${nameref[*]}" && -n "$default" ]]; then
            targetref+=( "$default" )
        elif type=$(declare -p "$name" 2> /dev/null); then
            case "${type#* }" in
                -A*)
                    echo "concatTo(): ERROR: trying to use concatTo on an associative array." >&2
                    return 1 ;;
                -a*)
                    targetref+=( "${nameref[@]}" ) ;;
                *)
                    if [[ "$name" = *"Array" ]]; then
                        targetref+=( ${nameref+"${nameref[@]}"} )
                    else
                        # shellcheck disable=SC2206
                        targetref+=( ${nameref-} )
                    fi
                    ;;
            esac
        fi
    done
}

concatStringsSep() {
    local sep="$1"
    local name="$2"
    local type
    local IFS
    if type=$(declare -p "$name" 2> /dev/null); then
        local -n nameref="$name"
        case "${type#* }" in
            -A*)
                echo "concatStringsSep(): ERROR: trying to use concatStringsSep on an associative array." >&2
                return 1 ;;
            -a*)
                IFS="$(printf '\036')" ;;
            *)
                IFS=" " ;;
        esac
        local ifs_separated="${nameref[*]}"
        echo -n "${ifs_separated//"$IFS"/"$sep"}"
    fi
}
