"""A real SMTP server for the tests (aiosmtpd, Debian python3-aiosmtpd).

usage: smtp_sink.py DIR PORT [CERT KEY]
With CERT and KEY it offers STARTTLS and requires it before MAIL.
Saves each accepted message as DIR/<unix ns>-<n>.eml (written beside, then renamed), refuses
recipients starting with "reject" with 550, prints "ready" once listening.
"""
import os
import sys
import time
import threading

from aiosmtpd.controller import Controller


class Handler:
    def __init__(self, out):
        self.out = out
        self.n = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower().startswith("reject"):
            return "550 5.1.1 <%s>: recipient refused by the test server" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.n += 1
        name = "%d-%d.eml" % (time.time_ns(), self.n)
        tmp = os.path.join(self.out, "." + name)
        with open(tmp, "wb") as f:
            f.write(envelope.original_content or envelope.content)
        os.rename(tmp, os.path.join(self.out, name))
        return "250 OK saved as %s" % name


def main():
    out, port = sys.argv[1], int(sys.argv[2])
    os.makedirs(out, exist_ok=True)
    tls = {}
    if len(sys.argv) > 4:
        import ssl
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(sys.argv[3], sys.argv[4])
        tls = {"tls_context": ctx, "require_starttls": True}
    controller = Controller(Handler(out), hostname="127.0.0.1", port=port, **tls)
    controller.start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
