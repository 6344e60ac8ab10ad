#!/bin/sh
# /opt/dfl/bin/dfl-keys, run by dfl-keys.service on the aggregator's host before
# dfl-aggregator.service: the federation's broker users and signing keys, made by
# `dfl admin` through RabbitMQ's management API, in $STATE_DIRECTORY (/var/lib/dfl/keys).
#
# Only what is missing is made, so it runs before every start of the aggregator:
# - aggregator.key/.pub and the broker user dfl-<federation>-aggregator, whose broker URL
#   (DFL_BROKER's host with this user and password) goes to aggregator.env for the aggregator;
# - for each party 0..DFL_NUM_PARTIES-1: <id>.pub here (the aggregator checks signatures with
#   it), and parties/<id>/ with what belongs on that party's host under /etc/dfl:
#   worker-<id>.env (DFL_BROKER with the party's user and password), keys/<id>.key and
#   keys/aggregator.pub. Copy it there, then delete it here (deploy/README.md).
#
# Environment: DFL_BROKER (scheme, host, port and vhost; any user:password in it is
# replaced), DFL_FEDERATION, DFL_NUM_PARTIES from /etc/dfl/dfl.env; RABBITMQ_MANAGEMENT_URL
# and DFL_ADMIN_PASSWORD from /etc/dfl/admin.env.
set -eu
keys=${STATE_DIRECTORY:-/var/lib/dfl/keys}
federation=${DFL_FEDERATION:-mnist}
parties=${DFL_NUM_PARTIES:?set DFL_NUM_PARTIES in /etc/dfl/dfl.env}
management=${RABBITMQ_MANAGEMENT_URL:?set RABBITMQ_MANAGEMENT_URL in /etc/dfl/admin.env}
broker=${DFL_BROKER:?set DFL_BROKER in /etc/dfl/dfl.env}
umask 077
cd "$keys"

admin() {
    dfl admin "$@" --federation "$federation" --keys "$keys" --management-url "$management"
}
env_file() {  # USER: DFL_BROKER with USER and its password, as an environment file
    # (each node's URL, for the several nodes of a cluster separated by commas)
    password=$(cat "$keys/$1.password")
    urls=""
    old_ifs=$IFS
    IFS=,
    for url in $broker; do
        rest=${url#*://}
        urls="${urls:+$urls,}${url%%://*}://$1:$password@${rest#*@}"
    done
    IFS=$old_ifs
    printf 'DFL_BROKER=%s\n' "$urls"
}

user="dfl-$federation-aggregator"
if [ ! -f aggregator.key ]; then
    rm -f "$user.password"
    admin add-aggregator
fi
env_file "$user" >aggregator.env.new
mv aggregator.env.new aggregator.env

i=0
while [ "$i" -lt "$parties" ]; do
    user="dfl-$federation-party-$i"
    if [ ! -f "$i.pub" ]; then
        rm -f "$i.key" "$user.password"
        admin add-party "$i"
        mkdir -p "parties/$i/keys"
        env_file "$user" >"parties/$i/worker-$i.env"
        mv "$i.key" "parties/$i/keys/$i.key"
        cp aggregator.pub "parties/$i/keys/aggregator.pub"
        rm "$user.password"
    fi
    i=$((i + 1))
done
