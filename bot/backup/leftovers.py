"""`python -m bot.backup.leftovers BUCKET PREFIX ENDPOINT REGION [SKIP_KEY...]`: abort the
unfinished S3 multipart uploads under PREFIX except SKIP_KEYs; prints how many.

A child process of the bot (RemoteStore.abort_leftovers): botocore's S3 model costs about
40 MB of memory that would otherwise stay in the bot for good. Credentials: botocore's own
chain (the same environment and workload identity obstore reads).
"""
from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    import botocore.session

    bucket, prefix, endpoint, region, *skip = argv
    client = botocore.session.get_session().create_client("s3", endpoint_url=endpoint or None,
                                                          region_name=region or None)
    aborted = 0
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for upload in page.get("Uploads", []):
            if upload["Key"] not in skip:
                client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
    print(aborted)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main(sys.argv[1:]))
    except Exception as e:  # one line for the bot to report, never a traceback (or a credential)
        print(f"{type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        raise SystemExit(1) from None
