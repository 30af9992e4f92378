"""The steps run on the server over ssh, as small POSIX sh scripts with quoted arguments.

mercure's rsync target already needs a shell there (``touch .complete``, ``mercure_complete.sh``);
these scripts use only POSIX sh, ``mkdir -p``, ``mv``, ``grep -F``, ``find`` and ``printf``.
Arguments are passed as positional parameters (``sh -c SCRIPT mercure ARG...``), each quoted
for the remote shell, so no folder name or tag value can become a command.
"""

from __future__ import annotations

#: Exit codes of the scripts below and what each means.
MEANINGS = {
    21: "the target folder does not exist on the server",
    22: "the series folder cannot be created",
    23: "the completion marker cannot be written",
    24: "both the series folder's name and its alternative are taken",
    25: "the staging folder cannot be renamed",
    26: "run_on_complete is set but mercure_complete.sh is missing or not executable",
}
#: Exit codes of PREPARE and FINALIZE that can never succeed as configured (HOOK runs the
#: site's script, whose exit codes are its own: its missing script is told by its message).
PERMANENT = {21, 24}

# $1 base, $2 parent, $3 final, $4 alternate, $5 staging, $6 marker probe.
# Prints "DONE <folder>" if this job's series is there already, else "STAGING".
PREPARE = r"""
base=$1 parent=$2 final=$3 alternate=$4 staging=$5 probe=$6
if [ ! -d "$base" ]; then
    echo "mercure: folder $base does not exist on this server; create it" >&2
    exit 21
fi
for folder in "$final" "$alternate"; do
    if [ -f "$folder/.complete" ] && grep -qF -- "$probe" "$folder/.complete"; then
        echo "DONE $folder"
        exit 0
    fi
done
mkdir -p -- "$parent" "$staging" || exit 22
echo STAGING
"""

# $1 staging, $2 final, $3 alternate, $4 marker text. Prints "FINAL <folder>".
FINALIZE = r"""
staging=$1 final=$2 alternate=$3 marker=$4
# Temporary files of an rsync that was cut off are hidden; they must not be published.
find "$staging" -type f -name '.*' ! -path "$staging/.complete" -exec rm -f -- {} + || exit 23
printf '%s\n' "$marker" > "$staging/.complete.part" || exit 23
mv -f -- "$staging/.complete.part" "$staging/.complete" || exit 23
if mv --version >/dev/null 2>&1; then gnu=1; else gnu=0; fi
publish() {
    if [ "$gnu" = 1 ]; then
        # GNU mv -T renames onto the name itself and refuses an existing, non-empty folder.
        out=$(mv -T -- "$staging" "$1" 2>&1) && return 0
    else
        [ -e "$1" ] && return 1
        out=$(mv -- "$staging" "$1" 2>&1) && return 0
    fi
    [ -e "$1" ] && return 1
    echo "$out" >&2
    exit 25
}
if publish "$final"; then echo "FINAL $final"; exit 0; fi
if publish "$alternate"; then echo "FINAL $alternate"; exit 0; fi
echo "mercure: cannot publish $staging: $final and $alternate exist; move one away" >&2
exit 24
"""

# $1 base, $2 series folder, $3 target name, $4 task id: mercure's completion script.
HOOK = r"""
script="$1/mercure_complete.sh"
if [ ! -x "$script" ]; then
    echo "mercure: run_on_complete is set but $script is missing or not executable" >&2
    exit 26
fi
exec "$script" "$2" rsync "$3" "$4"
"""
