"""Connects with asyncpg (a third-party driver) as libpq-style environment
variables say, and prints, as `key=value` lines: the process id the driver
got in BackendKeyData, what pg_backend_pid() returns on that connection, and
the process id of a NOTIFY the connection sent to itself."""

import asyncio
import os
import ssl

import asyncpg


async def main():
    env = os.environ
    ctx = ssl.create_default_context(cafile=env["PGSSLROOTCERT"])
    ctx.check_hostname = False
    conn = await asyncpg.connect(
        host=env["PGHOST"],
        port=int(env["PGPORT"]),
        user=env["PGUSER"],
        password=env["PGPASSWORD"],
        database=env["PGDATABASE"],
        ssl=ctx,
    )
    heard = asyncio.get_running_loop().create_future()

    def on_notify(_conn, pid, channel, payload):
        if not heard.done():
            heard.set_result((pid, payload))

    await conn.add_listener("gatehouse_self", on_notify)
    await conn.execute("notify gatehouse_self, 'from myself'")
    pid, payload = await asyncio.wait_for(heard, 5)
    print(f"driver_pid={conn.get_server_pid()}")
    print(f"backend_pid={await conn.fetchval('select pg_backend_pid()')}")
    print(f"notify_pid={pid}")
    print(f"payload={payload}")
    await conn.close()


asyncio.run(main())
