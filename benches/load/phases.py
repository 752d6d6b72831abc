"""Memory of keygate by phase: N idle client connections, then N requests in flight to a
slow upstream, then the same connections idle again, for ROUNDS rounds. Prints the serving
process's VmRSS / VmHWM and its established connections to the upstream after each phase.
Run by phases.sh, which starts keygate and the upstream stand-in.

Usage: python3 phases.py N KEYGATE_PORT KEYGATE_PID UPSTREAM_PORT [ROUNDS]
"""

import asyncio
import os
import subprocess
import sys

BODY = b'{"prompt":"A beautiful sunset over mountains","model":"imagen-v2"}'
REQUEST = (
    b"POST /v1/text-to-image HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Type: application/json\r\n"
    b"Authorization: Bearer kg_team_alpha_secret_token_0001\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
)


def memory(pid, upstream_port):
    status = dict(
        line.split(":", 1) for line in open(f"/proc/{pid}/status") if ":" in line
    )
    links = subprocess.run(
        ["ss", "-tnH", "state", "established", f"( dport = :{upstream_port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return (
        f"VmRSS {status['VmRSS'].strip():>10}  VmHWM {status['VmHWM'].strip():>10}  "
        f"upstream connections {len(links.splitlines())}  open files {len(os.listdir(f'/proc/{pid}/fd'))}"
    )


async def exchange(reader, writer):
    writer.write(REQUEST)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = [l for l in lines if l.lower().startswith(b"content-length:")]
    if length:
        await reader.readexactly(int(length[0].split(b":")[1]))
    else:  # chunked
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return lines[0].decode()


async def main():
    n, port, pid, upstream_port = (int(a) for a in sys.argv[1:5])
    rounds = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    print(f"started                 {memory(pid, upstream_port)}", flush=True)
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]
    await asyncio.sleep(1)
    print(f"{n} idle connections   {memory(pid, upstream_port)}", flush=True)
    for round_ in range(1, rounds + 1):
        answers = asyncio.gather(*(exchange(r, w) for r, w in connections))
        # The upstream answers after seconds: one second in, every request is at it.
        await asyncio.sleep(1)
        print(f"round {round_}: {n} in flight {memory(pid, upstream_port)}", flush=True)
        statuses = await answers
        await asyncio.sleep(0.5)
        counts = {s: statuses.count(s) for s in set(statuses)}
        print(f"round {round_}: answered    {memory(pid, upstream_port)}  {counts}", flush=True)


asyncio.run(main())
