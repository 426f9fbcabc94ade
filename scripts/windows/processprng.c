/*
 * bcryptprimitives.dll for Wine releases that predate ProcessPrng (Wine 8.0 among them).
 *
 * Rust's standard library (1.78 and later) takes its random bytes (HashMap keys, among
 * others) from ProcessPrng in bcryptprimitives.dll, which Windows 10 and later have. Wine 8.0
 * has no such DLL, so every Rust program stops at start. This one exports ProcessPrng and
 * fills the buffer from RtlGenRandom (advapi32's SystemFunction036), which Wine has.
 * Only for running tests under Wine: real Windows has its own DLL.
 */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}

BOOL WINAPI DllMain(HINSTANCE instance, DWORD reason, LPVOID reserved)
{
    (void)instance;
    (void)reason;
    (void)reserved;
    return TRUE;
}
