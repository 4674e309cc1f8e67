package bpf

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel -type dns_redirect -type dns_redirect6 -type dns_proxy_info dnsredirect dnsredirect.c
