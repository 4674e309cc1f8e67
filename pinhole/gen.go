package pinhole

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu -I../bpf" -target bpfel -type pinhole_event -type allow_key -type port_key -type pinhole_app -type sock_owner -type pinhole_proto -type port_role -type sock_kind -type event_kind pinhole pinhole.c
