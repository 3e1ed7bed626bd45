# A hostile guest kernel for tests/tests/hostile.rs: entered in 64-bit kernel
# mode by zeroboot's boot code (identity map of the first GiB, interrupts
# off), it writes pseudo-random data to every I/O port, to random
# guest-physical addresses above RAM (unbacked: MMIO to the VMM), and to the
# mailbox, and rings the doorbell, forever. Built for a 64 MiB guest: the
# mailbox is the top 2 MiB of RAM.
#   as --64 hostile-kernel.S -o k.o && ld -N -Ttext=0x200000 -e _start k.o -o k.elf
.intel_syntax noprefix
.code64
.set RAM_END,   0x4000000
.set MAILBOX,   0x3e00000
.set DOORBELL,  0xd0000000
.set PDPT,      0xa000          # zeroboot's boot page tables
.set PML4,      0x9000
.set NEW_PDS,   0x300000        # four page directories: 4 GiB of 2 MiB pages

.globl _start
_start:
    cli
    mov rsp, 0x1ff000
    mov r15, 0x9e3779b97f4a7c15  # xorshift64 state
    mov r14, DOORBELL

    # Map the first 4 GiB so that the doorbell and the MMIO hole are reachable.
    xor ecx, ecx
1:  mov rax, rcx
    shl rax, 21
    or rax, 0x83                # present, writable, 2 MiB
    mov [NEW_PDS + rcx*8], rax
    inc ecx
    cmp ecx, 2048
    jb 1b
    mov qword ptr [PDPT], NEW_PDS + 0x0003
    mov qword ptr [PDPT + 8], NEW_PDS + 0x1003
    mov qword ptr [PDPT + 16], NEW_PDS + 0x2003
    mov qword ptr [PDPT + 24], NEW_PDS + 0x3003
    mov rax, PML4
    mov cr3, rax

    # Every I/O port, out and in; every 16th also 16- and 32-bit. Skips the
    # two reset ports, which would end the run here.
    xor ecx, ecx
2:  cmp ecx, 0x64
    je 3f
    cmp ecx, 0xcf9
    je 3f
    call rand
    mov edx, ecx
    out dx, al
    in al, dx
    test ecx, 15
    jnz 3f
    out dx, ax
    in ax, dx
    out dx, eax
    in eax, dx
3:  inc ecx
    cmp ecx, 0x10000
    jb 2b

    # 20,000 random 8-byte stores and loads between the end of RAM and
    # 4 GiB, the doorbell page excepted.
    mov ebx, 20000
4:  call rand
    mov rdi, rax
    mov eax, 0xfffffff8
    and rdi, rax
    cmp rdi, RAM_END
    jb 5f
    mov rsi, rdi
    and rsi, -4096
    cmp rsi, r14
    je 5f
    call rand
    mov [rdi], rax
    mov rax, [rdi]
5:  dec ebx
    jnz 4b

    # Forever: garbage over the mailbox's first 4 KiB, then RESULT.
6:  mov rdi, MAILBOX
    mov ebx, 512
7:  call rand
    mov [rdi], rax
    add rdi, 8
    dec ebx
    jnz 7b
    mov byte ptr [r14], 2
    jmp 6b

# xorshift64: r15 → r15, also in rax.
rand:
    mov rax, r15
    shl rax, 13
    xor r15, rax
    mov rax, r15
    shr rax, 7
    xor r15, rax
    mov rax, r15
    shl rax, 17
    xor r15, rax
    mov rax, r15
    ret
