"""Guest (user) VMs with real VNC consoles, run as QEMU processes on this host.

Each guest is ``qemu-system-x86_64 -machine pc,accel=tcg -m 64 -nodefaults -vga std
-display none -vnc 127.0.0.1:0,to=N,password=on -qmp unix:...`` booting a 512-byte boot
sector (:mod:`manager.guests.payload`) that paints a colour gradient, so a console shows
something recognisable within a second. QEMU picks a free VNC display itself (``to=``) and
QMP ``query-vnc`` tells which; a fresh random VNC password is set over QMP
(``set_password``) on every start — until then QEMU refuses VNC clients.

API for the lead (deployVirtualMachine / destroyVirtualMachine / listVirtualMachines /
createConsoleEndpoint)::

    guests = GuestManager(run_dir)
    vm = await guests.deploy("web-1", account_id=acct)   # Running, vnc_port, vnc_password
    await guests.stop(vm.id); await guests.start(vm.id); await guests.destroy(vm.id)
    guests.get(vm.id); guests.list()
    await guests.console_target(vm.id)  # manager.consoleproxy.tokens.ConsoleRecords
    guests.on_destroy(cb)               # e.g. drop the VM's console tokens
    await guests.close()                # stops every guest (cleanup_ctx)
"""

from manager.guests.vm import GuestError, GuestManager, GuestState, GuestVm

__all__ = ["GuestError", "GuestManager", "GuestState", "GuestVm"]
