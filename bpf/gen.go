package bpf

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel -type audit_event -type rule_key -type rule_value -type app_key -type port_range -type app_info -type generation_info -type exe_key -type user_key -type name_key -type name_part -type name_value -type reason -type counter_slot -type hook procgate procgate.c

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel harden harden.c

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel lsmguard lsmguard.c
