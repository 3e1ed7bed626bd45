# Guest for examples/hugepage_probe.rs (256 MiB guest): in kernel mode it
# builds page tables (2 MiB user pages for the first 4 GiB, and 4 KiB user
# pages for 32 MiB at 4 GiB), a GDT and TSS, rings READY, and drops to user
# mode. There it reads one word of 8192 pages through the 2 MiB mapping,
# rings RESULT, the same through the 4 KiB mapping, RESULT, both again,
# RESULT.
#   as --64 hugepage_probe.S -o p.o && ld -N -Ttext=0x200000 -e _start p.o -o p.elf
.intel_syntax noprefix
.code64
.set DOORBELL,  0xd0000000
.set PML4,      0x600000
.set PDPT,      0x601000
.set PDS,       0x602000        # 4 PDs: 4 GiB of 2 MiB user pages
.set PD4K,      0x606000        # VA 4 GiB..: PD whose entries point at PTs
.set PTS,       0x610000        # 16 PTs (0x610000..0x61ffff)
.set GDT,       0x620000
.set TSS,       0x621000
.set R2M,       0x4000000       # 64 MiB: touched through 2 MiB pages
.set R4K,       0x6000000       # 96 MiB: touched through 4 KiB pages (VA 4 GiB)
.set NPAGES,    8192

.globl _start
_start:
    cli
    mov rsp, 0x1ff000
    # 2 MiB user pages for 0..4 GiB
    xor ecx, ecx
1:  mov rax, rcx
    shl rax, 21
    or rax, 0x87
    mov [PDS + rcx*8], rax
    inc ecx
    cmp ecx, 2048
    jb 1b
    mov qword ptr [PDPT], PDS + 0x0007
    mov qword ptr [PDPT + 8], PDS + 0x1007
    mov qword ptr [PDPT + 16], PDS + 0x2007
    mov qword ptr [PDPT + 24], PDS + 0x3007
    mov qword ptr [PDPT + 32], PD4K + 0x7
    # PD4K: 16 entries -> PTs
    xor ecx, ecx
2:  mov rax, rcx
    shl rax, 12
    add rax, PTS + 7
    mov [PD4K + rcx*8], rax
    inc ecx
    cmp ecx, 16
    jb 2b
    # PTs: 8192 4 KiB user pages -> R4K
    xor ecx, ecx
3:  mov rax, rcx
    shl rax, 12
    add rax, R4K + 7
    mov [PTS + rcx*8], rax
    inc ecx
    cmp ecx, NPAGES
    jb 3b
    mov qword ptr [PML4], PDPT + 7
    # GDT: null, kcode, kdata, udata, ucode, tss(2)
    mov qword ptr [GDT], 0
    mov rax, 0x00af9b000000ffff
    mov [GDT + 8], rax
    mov rax, 0x00cf93000000ffff
    mov [GDT + 16], rax
    mov rax, 0x00cff3000000ffff
    mov [GDT + 24], rax
    mov rax, 0x00affb000000ffff
    mov [GDT + 32], rax
    mov qword ptr [TSS + 4], 0x1fe000    # rsp0
    # TSS descriptor base=TSS (0x621000) limit 0x67 type 0x89
    mov rax, 0x0000890000000067
    mov rbx, TSS
    mov rdx, rbx
    and rdx, 0xffffff
    shl rdx, 16
    or rax, rdx
    mov rdx, rbx
    shr rdx, 24
    and rdx, 0xff
    shl rdx, 56
    or rax, rdx
    mov [GDT + 40], rax
    mov qword ptr [GDT + 48], 0
    mov word ptr [gdtr], 55
    mov qword ptr [gdtr + 2], GDT
    lgdt [gdtr]
    mov ax, 0x28
    ltr ax
    mov rax, PML4
    mov cr3, rax
    # Ready (from kernel mode): the host now madvises its memory.
    mov r14, DOORBELL
    mov byte ptr [r14], 1
    # to user mode
    push 0x1b
    push 0x1ff000 - 0x10000
    push 0x2
    push 0x23
    lea rax, [rip + user]
    push rax
    iretq

# Reads one word of each of NPAGES pages from \base on.
.macro touch base
    mov rdi, \base
    mov ecx, NPAGES
1:  mov rax, [rdi]
    add rdi, 4096
    dec ecx
    jnz 1b
.endm

user:
    mov r14, DOORBELL
    mov r13, 0x100000000         # the 4 KiB mapping of R4K
    touch R2M
    mov byte ptr [r14], 2
    touch r13
    mov byte ptr [r14], 2
    touch R2M
    touch r13
    mov byte ptr [r14], 2
8:  jmp 8b
.data
gdtr: .word 0
      .quad 0
