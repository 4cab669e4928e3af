#!/usr/bin/env python3
"""Runs a runbook attached and prints its events; Ctrl-C cancels the call, and statelyd
cancels the job and unwinds it (the script then follows the unwind to its end; a second
Ctrl-C stops following, and the daemon still unwinds).

    STATELY_SERVER=127.0.0.1:50051 STATELY_TOKEN=... python3 run_runbook.py motd text=hello

The stubs come from proto/ (see README.md in this directory): jobs_pb2, jobs_pb2_grpc on
PYTHONPATH as stately/v1/.
"""
import os
import signal
import sys
import threading

import grpc
from stately.v1 import jobs_pb2, jobs_pb2_grpc

TERMINAL = {jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED}


def describe(e):
    kind = e.WhichOneof("event")
    if kind == "state_changed":
        return "seq %d: state %s (%s)" % (e.seq, jobs_pb2.JobState.Name(e.state_changed.to), e.state_changed.reason)
    if kind == "log":
        return "seq %d: log: %s" % (e.seq, e.log.message)
    if kind == "step_started":
        return "seq %d: step %d started: %s" % (e.seq, e.step_started.index + 1, e.step_started.name)
    return "seq %d: %s" % (e.seq, kind)


def main():
    if len(sys.argv) < 2:
        print("usage: run_runbook.py RUNBOOK [key=value ...]", file=sys.stderr)
        return 2
    params = dict(a.split("=", 1) for a in sys.argv[2:])
    server = os.environ.get("STATELY_SERVER", "127.0.0.1:50051")
    metadata = [("authorization", "Bearer " + os.environ["STATELY_TOKEN"])]
    channel = grpc.insecure_channel(server)
    jobs = jobs_pb2_grpc.JobsStub(channel)
    req = jobs_pb2.SubmitJobRequest(
        spec=jobs_pb2.JobSpec(runbook=jobs_pb2.RunbookJob(runbook=sys.argv[1], params=params))
    )
    call = jobs.RunJob(req, metadata=metadata)
    # Ctrl-C must not raise KeyboardInterrupt inside grpc: an exception thrown into its
    # Condition.wait can leave the call's lock half released, and the script then hangs or
    # dies with "cannot release un-acquired lock". The handler only starts a thread that
    # cancels the call; the stream then ends with CANCELLED where the script expects it.
    interrupted = threading.Event()

    def on_ctrl_c(_signum, _frame):
        if not interrupted.is_set():
            interrupted.set()
            threading.Thread(target=call.cancel, daemon=True).start()
            signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, on_ctrl_c)
    job_id, last, state = None, 0, None
    try:
        for e in call:
            job_id, last = e.job_id, e.seq
            print(describe(e), flush=True)
            if e.WhichOneof("event") == "state_changed" and e.state_changed.to in TERMINAL:
                state = e.state_changed.to
    except grpc.RpcError as err:
        if not (interrupted.is_set() and err.code() == grpc.StatusCode.CANCELLED):
            print("run_runbook: %s: %s" % (err.code().name, err.details()), file=sys.stderr)
            return 3
    if interrupted.is_set() and state is None and job_id is None:
        print("interrupted before the daemon accepted the job", file=sys.stderr)
        return 1
    if interrupted.is_set() and state is None:
        # Ending the attached call is the cancel: the daemon unwinds the job.
        print("interrupted: job %s is cancelled and unwound by the daemon" % job_id, flush=True)
        try:
            for e in jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id, after_seq=last), metadata=metadata):
                print(describe(e), flush=True)
                if e.WhichOneof("event") == "state_changed" and e.state_changed.to in TERMINAL:
                    state = e.state_changed.to
        except KeyboardInterrupt:
            print("stopped following job %s" % job_id, file=sys.stderr)
            return 130
    return 0 if state == jobs_pb2.JOB_STATE_SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
