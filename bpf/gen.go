package bpf

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel -type audit_event -type grant_v4_key -type grant_v6_key -type lpm_v4_key -type lpm_v6_key -type grant_value -type port_range -type app_info -type generation_info procgate procgate.c
