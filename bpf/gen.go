package bpf

// The generated sock_bpfel.go/.o are committed so that building kpr needs no
// clang; re-run this after editing sock.c or anything under include/.
//go:generate go tool bpf2go -target bpfel -cc clang -cflags "-O2 -g -Wall -Werror -nostdinc -I./include" -type svc_key -type svc_value -type backend -type revnat -type sk_revnat_key -type sk_revnat_value -type affinity_key -type affinity_value -type affinity_match_key -type svc_cidr_key sock sock.c
