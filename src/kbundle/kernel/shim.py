"""The few lines of Python that run first inside a kernel container, with the env's interpreter.

They read the connection info (with its HMAC key) from stdin, never from argv, environment
or mounts that `docker inspect` would show; write it to a 0600 file inside the container;
end the kernel when stdin reaches EOF (the launcher is gone, even by SIGKILL); and run
ipykernel in this very process, so that the signal tini forwards reaches it.
"""

NOTES_VARIABLE = "KBUNDLE_NOTES"  # the banner's first lines: what is mounted and how, the network

# Runs inside the container with the env's python. It must work on old interpreters too
# (no f-strings), holds no secret, and keeps the kernel in this very process so that the
# signal tini forwards reaches ipykernel itself.
SHIM = """\
import os, sys
if sys.path and sys.path[0] == '':
    del sys.path[0]
_pc = os.environ.get('KBUNDLE_PYCACHE')
if _pc:
    # An environment installed without .pyc files (rattler does not compile) would be
    # compiled again at every start: keep the bytecode in kbundle's cache instead. Decided
    # first, with os alone, so that the shim's own imports below are cached too.
    for _d in sys.path:
        _k = os.path.join(_d, 'ipykernel')
        if os.path.isfile(os.path.join(_k, '__init__.py')):
            if not os.path.isdir(os.path.join(_k, '__pycache__')):
                sys.pycache_prefix = _pc
            break
import tempfile, threading
# ipykernel is imported before the connection info is read: the import (the longest part of
# a start) overlaps the launcher's last calls to the engine.
try:
    from ipykernel import kernelapp
except ImportError as exc:
    sys.stderr.write('kbundle-kernel: ipykernel is missing from the image environment: %s\\n' % exc)
    os._exit(4)
def _line():
    data = b''
    while not data.endswith(b'\\n'):
        chunk = os.read(0, 65536)
        if not chunk:
            sys.stderr.write('kbundle-kernel: no connection info on stdin\\n')
            os._exit(3)
        data += chunk
    return data
_info = _line()
_fd, _path = tempfile.mkstemp(prefix='kbundle-kernel-', suffix='.json')
os.write(_fd, _info)
os.close(_fd)
del _info
def _watch():
    while os.read(0, 65536):
        pass
    os._exit(0)
_t = threading.Thread(target=_watch)
_t.daemon = True
_t.start()
def _banner():
    # What the recipient wants to know first: which bundle, image and CUDA, and which GPUs the
    # container really sees (device nodes exist only for those passed through, named by the
    # host's index). A request the engine dropped is said, never left to look like CPU by choice.
    import glob
    gpus = sorted(glob.glob('/dev/nvidia[0-9]*'), key=lambda p: (len(p), p))
    asked = os.environ.get('KBUNDLE_GPUS_ASKED', 'none')
    if gpus:
        seen = 'GPU visible: %d (%s)' % (len(gpus), ', '.join(os.path.basename(g) for g in gpus))
    elif asked != 'none':
        seen = 'no GPU visible (CPU only), though the kernel asked for GPUs %s' % asked
    else:
        seen = 'no GPU visible (CPU only)'
    notes = os.environ.get('KBUNDLE_NOTES', '')
    return (notes + '\\n' if notes else '') + 'kbundle: %s | image %s | CUDA %s | %s' % (
        os.environ.get('KBUNDLE_BANNER_BUNDLE', '?'), os.environ.get('KBUNDLE_BANNER_IMAGE', '?'),
        os.environ.get('KBUNDLE_BANNER_CUDA', 'unknown'), seen)
# parent_handle=1: no parent poller (tini is our parent) and no `ipython kernel` banner.
# The shell's banner2 follows IPython's own line in kernel_info (consoles show it); ipykernel
# has no banner option of its own.
kernelapp.launch_new_instance(argv=['-f', _path, '--IPKernelApp.parent_handle=1',
                                    '--InteractiveShell.banner2=' + _banner()])
"""
