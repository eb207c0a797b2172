package bpf

// The generated *_bpfel.go/.o are committed so that building kpr needs no
// clang; re-run this after editing sock.c, lb.c, lb_maps.h or anything under include/.
//go:generate go tool bpf2go -target bpfel -cc clang -cflags "-O2 -g -Wall -Werror -nostdinc -I./include" -type svc_key -type svc_value -type backend -type revnat -type sk_revnat_key -type sk_revnat_value -type sk_peer -type sk_conn -type affinity_key -type affinity_value -type affinity_match_key -type svc_cidr_key sock sock.c

// The north-south tc programs: a second object whose shared maps (lb_maps.h) are pinned by the
// same names as the socket object's, so both use one kernel map each.
//go:generate go tool bpf2go -target bpfel -cc clang -cflags "-O2 -g -Wall -Werror -nostdinc -I./include" -type lb_stat lb lb.c
