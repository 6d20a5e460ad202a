#!/bin/sh
# modules.sh FROM TO MODULE...: copies the kernel modules named, and every
# module they depend on (their .modinfo depends=), from the unpacked
# kernel package's module tree FROM into TO, flat. The guest's init runs
# busybox depmod over them and loads them with modprobe.
set -e
from=$1 to=$2
shift 2
mkdir -p "$to"
want="$*" seen=""
while [ -n "$want" ]; do
	set -- $want
	m=$1
	shift
	want="$*"
	case " $seen " in *" $m "*) continue ;; esac
	seen="$seen $m"
	f=$(find "$from" \( -name "$m.ko" -o -name "$(echo "$m" | tr _ -).ko" -o -name "$(echo "$m" | tr - _).ko" \) | head -1)
	if [ -z "$f" ]; then
		echo "modules.sh: no module $m under $from" >&2
		exit 1
	fi
	cp "$f" "$to/"
	want="$want $(tr '\0' '\n' < "$f" | sed -n 's/^depends=//p' | tr ',' ' ')"
done
