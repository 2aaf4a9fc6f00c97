#!/bin/sh
# rank 0 waits at its fabric address for rank 1's number and answers with the sum (a
# rendezvous and an all-reduce of two ranks over TCP); each prints what it ends with, and the
# image's /marker when it runs in a container of a test image
where=$(cat /marker 2>/dev/null) && where=" in $where"
v=$(( (SLURM_PROCID + 1) * 10 ))
if [ "$SLURM_PROCID" = 0 ]; then
    printf '#!/bin/sh\nread o\ns=$((o + %s))\necho $s > /tmp/sum\necho $s\n' "$v" > /tmp/reduce
    chmod +x /tmp/reduce
    nc -l -p 29500 -e /tmp/reduce
    echo "rank 0 of $SLURM_NTASKS on $SLURMD_NODENAME sum $(cat /tmp/sum)$where"
else
    i=0
    until s=$(echo "$v" | nc -w 3 "$MASTER_ADDR" 29500) && [ -n "$s" ]; do
        i=$((i + 1)); [ $i -gt 150 ] && break; sleep 0.2
    done
    echo "rank 1 of $SLURM_NTASKS on $SLURMD_NODENAME sum $s$where"
fi
