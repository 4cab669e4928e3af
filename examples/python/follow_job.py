#!/usr/bin/env python3
"""Follows a job's events to its end across daemon restarts: when the stream breaks, it
reconnects (backing off) and resumes after the last event it printed, so nothing is missed
and nothing repeated.

    STATELY_SERVER=127.0.0.1:50051 STATELY_TOKEN=... python3 follow_job.py JOB_ID [AFTER_SEQ]
"""
import os
import sys
import time

import grpc
from stately.v1 import jobs_pb2, jobs_pb2_grpc

TERMINAL = {jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED}


def main():
    if len(sys.argv) < 2:
        print("usage: follow_job.py JOB_ID [AFTER_SEQ]", file=sys.stderr)
        return 2
    job_id = sys.argv[1]
    last = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    server = os.environ.get("STATELY_SERVER", "127.0.0.1:50051")
    metadata = [("authorization", "Bearer " + os.environ["STATELY_TOKEN"])]
    pause, lost_since = 0.05, None
    while True:
        channel = grpc.insecure_channel(server)
        jobs = jobs_pb2_grpc.JobsStub(channel)
        try:
            for e in jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id, after_seq=last), metadata=metadata):
                lost_since, pause = None, 0.05
                if e.seq <= last:
                    continue
                last = e.seq
                print("seq %d %s" % (e.seq, e.WhichOneof("event")), flush=True)
                if e.WhichOneof("event") == "state_changed" and e.state_changed.to in TERMINAL:
                    return 0
        except grpc.RpcError as err:
            # UNAVAILABLE, or CANCELLED for a connection broken mid-call: the daemon is away.
            if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                print("follow_job: %s: %s" % (err.code().name, err.details()), file=sys.stderr)
                return 3
        # The stream ended before the job did: the daemon is restarting. Resume.
        lost_since = lost_since or time.monotonic()
        if time.monotonic() - lost_since > 60:
            print("follow_job: statelyd did not come back within a minute", file=sys.stderr)
            return 3
        channel.close()
        time.sleep(pause)
        pause = min(pause * 2, 2.0)


if __name__ == "__main__":
    sys.exit(main())
