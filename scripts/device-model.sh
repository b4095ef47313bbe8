# Sourced by the device bench scripts: MODEL names a synthetic file they generate into /tmp.
#   q8_0, q4_k_m, ...          the 52-layer Nemotron-width model in that mix (/tmp/nano52-MIX.gguf)
#   PRESET/MIX                 a gen-model preset with all its layers (/tmp/PRESET-MIX.gguf),
#                              e.g. qwen3moe-30b-a3b/q4_k_m, gpt-oss-20b/mxfp4
#   PRESET/MIX/LAYERS          the same with LAYERS layers (/tmp/PRESET-MIX-LAYERS.gguf)
# Sets $model_file and $gen_args.
case "$1" in
  */*/*) IFS=/ read -r preset mix layers <<< "$1"
    model_file="/tmp/$preset-$mix-$layers.gguf"
    gen_args="--preset $preset --mix $mix --layers $layers" ;;
  */*) model_file="/tmp/${1%%/*}-${1#*/}.gguf"; gen_args="--preset ${1%%/*} --mix ${1#*/}" ;;
  *) model_file="/tmp/nano52-$1.gguf"; gen_args="--layers 52 --mix $1" ;;
esac
