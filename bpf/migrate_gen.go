package bpf

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel -type cgroup_path_key -type cgroup_globs -type cgroup_glob migrate migrate.c
