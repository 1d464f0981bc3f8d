#!/bin/sh
# docker-compose.yml's s3 service: SeaweedFS with the security configuration that the s3-security service
# wrote for this start (JWT keys of the volume server, the gRPC certificates: see
# trafficwatch.services.write_seaweedfs_security). Those files belong to the pipeline image's user; they are
# copied, private, for the user that runs weed (the image's entrypoint drops root for `seaweed` when that user
# exists), then the image's own entrypoint starts weed with this service's command.
set -eu
source_dir=/etc/seaweedfs/trafficwatch
target_dir=/run/seaweedfs-security
owner="$(id -u seaweed 2>/dev/null || id -u)"
test -f "$source_dir/security.toml" || { echo "start.sh: no $source_dir/security.toml (s3-security)" >&2; exit 1; }
rm -rf "$target_dir"
mkdir -m 700 "$target_dir"
for file in "$source_dir"/*; do
  install -m 600 "$file" "$target_dir/"
done
chown -R "$owner" "$target_dir"
exec /entrypoint.sh "$@"
